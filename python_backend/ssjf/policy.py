"""Scheduling policies: who runs next. Admission (how many fit) lives in scheduler.py.

Every policy is a RequestQueue. Priority policies order by a key defined once
(`sort_key`); ties go to the earlier arrival. The starvation guard (aging) sits in
the priority queue. A request is *starving* once any of its bounds is reached; starving
requests are served before all others, oldest first. The bounds (each 0 = off):
  starvation_s      it has waited this long;
  max_bypass_ratio  the later arrivals served ahead of it have held it up for this many
                    times its own length in decode steps (lengths as the policy estimates
                    them): its extra wait from reordering is bounded relative to its own
                    size, so a job predicted short is passed over little and a long one
                    more. A job of length L passing it holds it up L/slots steps when
                    slots run side by side (continuous batching, or one slot), and in
                    request-level batches (`batch_rounds`) a batch holds it up as long
                    as the batch's longest job that passed it;
  max_passes        this many later arrivals were served ahead of it, whatever their size.
The two pass bounds are scale-free: they hold whatever the load or the hardware speed.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import time
from typing import Callable, Iterator

from .metrics import RankWindow
from .request import Request

# Key for a request whose length is unknown (no prediction): a typical chat answer.
UNKNOWN_LENGTH = 256


class RequestQueue:
    """The waiting queue interface every policy implements."""

    def add(self, req: Request) -> None:
        raise NotImplementedError

    def peek(self) -> Request:
        raise NotImplementedError

    def pop(self) -> Request:
        raise NotImplementedError

    def remove(self, req: Request) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Request]:
        """Waiting requests in the order the policy would serve them now."""
        raise NotImplementedError

    def __bool__(self) -> bool:
        return len(self) > 0

    def new_round(self) -> None:
        """The scheduler is about to admit a new request-level batch (dynamic batching)."""

    def observe(self, req: Request) -> None:
        """A request ended with its true length: a policy that learns from it does so here."""

    def trusts_estimates(self) -> bool:
        """Whether its length estimates rank well enough to preempt on."""
        return True


class FCFSQueue(RequestQueue):
    """First come, first served (within a priority class; the lower class first)."""

    def __init__(self):
        self._q: dict[int, collections.deque[Request]] = {}

    def add(self, req: Request) -> None:
        self._q.setdefault(req.priority, collections.deque()).append(req)

    def _first(self) -> collections.deque[Request]:
        for cls in sorted(self._q):
            if self._q[cls]:
                return self._q[cls]
        raise IndexError("peek from an empty queue")

    def peek(self) -> Request:
        return self._first()[0]

    def pop(self) -> Request:
        return self._first().popleft()

    def remove(self, req: Request) -> bool:
        try:
            self._q.get(req.priority, collections.deque()).remove(req)
            return True
        except ValueError:
            return False

    def __len__(self) -> int:
        return sum(map(len, self._q.values()))

    def __iter__(self) -> Iterator[Request]:
        return iter([r for cls in sorted(self._q) for r in self._q[cls]])


class PriorityQueue(RequestQueue):
    """Smallest sort_key first, with the starvation guard over arrival order."""

    def __init__(self, *, starvation_s: float = 0.0, clock: Callable[[], float] = time.monotonic, max_passes: int = 0,
                 max_bypass_ratio: float = 0.0, slots: int = 1, batch_rounds: bool = False):
        self.starvation_s = starvation_s
        self.max_passes = max_passes
        self.max_bypass_ratio = max_bypass_ratio
        self.slots = max(1, slots)  # requests decoded side by side
        self.batch_rounds = batch_rounds  # request-level batches: a batch lasts as long as its longest job
        self.clock = clock
        self._passes: dict[int, int] = {}  # seq -> later arrivals served ahead of it
        self._passed_over: set[int] = set()  # seqs a pass bound has made starving (for good: the counts only grow)
        self._held_up: dict[int, float] = {}  # seq -> decode steps those later arrivals held it up
        self._round: dict[int, float] = {}  # seq -> the longest hold-up by one job of the current batch
        self._heap: list[tuple[int, float, int, int, Request]] = []  # (class, key, seq, entry, request)
        self._entries = itertools.count()
        self._entry: dict[int, int] = {}  # seq -> its current heap entry (a request back from preemption has a new key)
        self._fifo: dict[int, collections.deque[Request]] = {}  # per class, in arrival order
        self._live: dict[int, Request] = {}  # seq -> request; heap and fifo entries not here are stale
        self._classes: collections.Counter[int] = collections.Counter()  # live requests per class

    def sort_key(self, req: Request) -> float:
        raise NotImplementedError

    def add(self, req: Request) -> None:
        self._live[req.seq] = req
        self._classes[req.priority] += 1
        entry = self._entry[req.seq] = next(self._entries)
        heapq.heappush(self._heap, (req.priority, self.sort_key(req), req.seq, entry, req))
        fifo = self._fifo.setdefault(req.priority, collections.deque())
        if fifo and fifo[-1].seq > req.seq:  # a preempted request comes back in its arrival place
            fifo.append(req)
            self._fifo[req.priority] = collections.deque(sorted(fifo, key=lambda r: r.seq))
        else:
            fifo.append(req)
        if req.preemptions:  # each time it gave its place back counts as a pass (the guard's bounds hold)
            self._passes[req.seq] = self._passes.get(req.seq, 0) + req.preemptions

    def _first_class(self) -> int | None:
        return min((c for c, n in self._classes.items() if n > 0), default=None)

    def _oldest(self) -> Request | None:
        cls = self._first_class()
        fifo = self._fifo.get(cls)
        while fifo and fifo[0].seq not in self._live:
            fifo.popleft()
        return fifo[0] if fifo else None

    def _shortest(self) -> Request | None:
        while self._heap and (self._heap[0][2] not in self._live or self._entry.get(self._heap[0][2]) != self._heap[0][3]):
            heapq.heappop(self._heap)
        return self._heap[0][4] if self._heap else None

    def is_starving(self, req: Request) -> bool:
        if self.max_passes > 0 and self._passes.get(req.seq, 0) >= self.max_passes:
            return True
        if (self.max_bypass_ratio > 0
                and self._held_up.get(req.seq, 0.0) >= self.max_bypass_ratio * max(self.sort_key(req), 1.0)):
            return True
        return self.starvation_s > 0 and self.clock() - req.arrival_time >= self.starvation_s

    def peek(self) -> Request:
        oldest = self._oldest()
        if oldest is None:
            raise IndexError("peek from an empty queue")
        if self.is_starving(oldest):  # the oldest is also the first to reach starvation_s
            return oldest
        passed = [seq for seq in self._passed_over if self._live[seq].priority == oldest.priority]
        if passed:  # the relative bound can starve a younger request first: the oldest of those
            return self._live[min(passed)]
        return self._shortest()

    def pop(self) -> Request:
        req = self.peek()
        del self._live[req.seq]
        self._classes[req.priority] -= 1
        self._forget(req)
        if self.max_passes > 0 or self.max_bypass_ratio > 0:
            steps = self.sort_key(req) / self.slots
            for seq, other in self._live.items():  # everyone of its class who arrived earlier was passed over
                if seq < req.seq and other.priority == req.priority:
                    self._passes[seq] = self._passes.get(seq, 0) + 1
                    held = steps
                    if self.batch_rounds:  # only the part beyond this batch's earlier hold-ups of it
                        before = self._round.get(seq, 0.0)
                        held, self._round[seq] = max(0.0, steps - before), max(before, steps)
                    self._held_up[seq] = self._held_up.get(seq, 0.0) + held
                    if self.is_starving(self._live[seq]):
                        self._passed_over.add(seq)
        return req

    def new_round(self) -> None:
        self._round.clear()

    def _forget(self, req: Request) -> None:
        self._entry.pop(req.seq, None)  # its heap entries are stale now (seq not live); a re-add gets a new one
        self._passed_over.discard(req.seq)
        self._passes.pop(req.seq, None)
        self._held_up.pop(req.seq, None)
        self._round.pop(req.seq, None)

    def remove(self, req: Request) -> bool:
        self._forget(req)
        if self._live.pop(req.seq, None) is None:
            return False
        self._classes[req.priority] -= 1
        return True

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        starving = [r for r in self._live.values() if self.is_starving(r)]
        starving.sort(key=lambda r: (r.priority, r.arrival_time, r.seq))
        rest = [r for r in self._live.values() if not self.is_starving(r)]
        rest.sort(key=lambda r: (r.priority, self.sort_key(r), r.seq))
        return iter(sorted(starving + rest, key=lambda r: r.priority))  # stable: the class, then that order


class SSJFQueue(PriorityQueue):
    """Speculative shortest job first: the proxy's predicted output length. With
    `cap_by_max_tokens`, a prediction above the request's max_tokens counts as max_tokens: the
    job cannot run longer than its client allows, whatever the proxy says."""

    def __init__(self, *, cap_by_max_tokens: bool = False, **guard):
        super().__init__(**guard)
        self.cap_by_max_tokens = cap_by_max_tokens

    def predicted(self, req: Request) -> float:
        length = req.predicted_length if req.predicted_length is not None else UNKNOWN_LENGTH
        if self.cap_by_max_tokens and req.max_tokens is not None:
            return min(length, req.max_tokens)
        return length

    def sort_key(self, req: Request) -> float:
        return self.predicted(req)


class LengthSpread:
    """The proxy's guess as a distribution: log-normal, its median the prediction times a learned
    bias, its spread sigma (of log(true / predicted)), both learned from the errors of the requests
    the server finishes (a running mean over about 1/weight of them). A job's expected remaining
    length given how long it has run is the key that lets a job which outlives its guess be ranked
    again while it runs."""

    def __init__(self, sigma: float = 0.8, weight: float = 0.02, floor: float = 0.2, ceiling: float = 2.5):
        self.bias, self.var = 0.0, sigma * sigma
        self.weight, self.floor, self.ceiling = weight, floor, ceiling
        self.observed = 0

    @property
    def sigma(self) -> float:
        return min(self.ceiling, max(self.floor, math.sqrt(self.var)))

    def observe(self, predicted: float, true: int) -> None:
        if predicted <= 0 or true <= 0:
            return
        x = math.log(true / predicted)
        w = max(self.weight, 1.0 / (self.observed + 2))  # the first errors count fully, then a running mean
        self.observed += 1
        self.bias += w * (x - self.bias)
        self.var += w * ((x - self.bias) ** 2 - self.var)

    def scale(self) -> float:
        """A fresh job's expected length over its prediction, as learned so far: exp(bias + sigma^2/2)."""
        s = self.sigma
        return math.exp(self.bias + s * s / 2)

    def expected_remaining(self, predicted: float, age: int, limit: int | None = None) -> float:
        """E[L - age | L > age] for L log-normal around `predicted`, capped at `limit` tokens left."""
        s = self.sigma
        mu = math.log(max(predicted, 1.0)) + self.bias
        if age <= 0:
            rest = math.exp(mu + s * s / 2)
        else:
            z = (math.log(age) - mu) / s
            if z < 6.0:
                # E[L | L > a] = e^(mu + s^2/2) Phi(s - z) / Phi(-z)
                rest = math.exp(mu + s * s / 2) * math.erfc((z - s) / math.sqrt(2)) / math.erfc(z / math.sqrt(2)) - age
            else:  # far in the tail: the log-normal's mean residual life, a s / z
                rest = age * s / z
        rest = max(rest, 1.0)
        return min(rest, limit) if limit is not None else rest


class SSRPTQueue(SSJFQueue):
    """Speculative shortest *remaining* processing time: the key is the expected remaining length
    given the tokens a job has generated (LengthSpread), so the scheduler can take a running job's
    place back for a waiting one that is expected to finish much sooner (Scheduler's preemption)."""

    MIN_RANKED = 20  # finished requests before their tau is taken to judge the predictions
    RANK_EVERY = 10  # the tau is recomputed every this many finished requests (it runs on the engine thread)

    def __init__(self, *, spread: LengthSpread | None = None, min_tau: float = 0.0, **kw):
        super().__init__(**kw)
        self.spread = spread or LengthSpread()
        self.min_tau = min_tau
        self.ranks = RankWindow(200)
        self._tau, self._unranked = 0.0, 0

    def remaining(self, req: Request) -> float:
        """Its expected remaining length in tokens, given the tokens it has generated."""
        # like SSJF's cap: in trace replay max_tokens *is* the true length, so it is read only where allowed
        left = req.tokens_left if self.cap_by_max_tokens and req.max_tokens is not None else None
        return self.spread.expected_remaining(self.predicted(req), len(req.output_ids), left)

    def sort_key(self, req: Request) -> float:
        """A job that has not run keys at its prediction, as under SSJF, whenever it arrived; one that
        has, at its expected remaining length in units of the spread's current scale (what a fresh
        job's prediction stands for). Keys in tokens, taken as the spread learned its bias, put later
        arrivals ahead of earlier ones with the same prediction: with a constant guess that alone
        cost 5-12% of FCFS's p99 in simulation."""
        if not req.output_ids:
            return super().sort_key(req)
        return self.remaining(req) / self.spread.scale()

    def observe(self, req: Request) -> None:
        if req.predicted_length is not None:
            self.spread.observe(self.predicted(req), len(req.output_ids))
            self.ranks.add(req.predicted_length, len(req.output_ids))
            self._unranked += 1
            if self._unranked >= self.RANK_EVERY or len(self.ranks) == self.MIN_RANKED:
                self._tau, self._unranked = self.ranks.kendall_tau(), 0

    def trusts_estimates(self) -> bool:
        """A useless proxy (a constant, or one that ranks this traffic no better than chance) would
        preempt on noise: with the guard's passes as the only gain, it costs the tail. Preemption
        waits for the predictions to rank finished requests at least min_tau."""
        return self.min_tau <= 0 or len(self.ranks) < self.MIN_RANKED or self._tau >= self.min_tau


class OracleSRPTQueue(SSRPTQueue):
    """SRPT on the true remaining length (where ignore_eos fixes it), for the bound it sets."""

    def remaining(self, req: Request) -> float:
        if req.true_length is not None:
            return req.true_length - len(req.output_ids)
        return super().remaining(req)

    def sort_key(self, req: Request) -> float:
        return self.remaining(req) if req.true_length is not None else super().sort_key(req)

    def trusts_estimates(self) -> bool:
        return True


class OracleSJFQueue(SSJFQueue):
    """Shortest job first on the true length (known when ignore_eos fixes it via max_tokens);
    requests without one fall back to SSJF's key."""

    def sort_key(self, req: Request) -> float:
        return req.true_length if req.true_length is not None else self.predicted(req)


def make_queue(config, clock: Callable[[], float] = time.monotonic) -> RequestQueue:
    """The waiting queue for an EngineConfig: its policy, with its starvation guard. In request-level
    batches (dynamic batching) one batch holds the queue up as long as its longest job."""
    if config.policy == "fcfs":
        return FCFSQueue()
    classes = {"ssjf": SSJFQueue, "sjf_oracle": OracleSJFQueue, "ssrpt": SSRPTQueue, "srpt_oracle": OracleSRPTQueue}
    if config.policy in classes:
        dynamic = config.batching == "dynamic"
        cls = classes[config.policy]
        extra = ({"spread": LengthSpread(config.length_sigma), "min_tau": config.preempt_min_tau}
                 if issubclass(cls, SSRPTQueue) else {})
        return cls(starvation_s=config.starvation_s, clock=clock, max_passes=config.max_passes,
                   max_bypass_ratio=config.max_bypass_ratio, cap_by_max_tokens=config.cap_by_max_tokens,
                   slots=1 if dynamic else config.max_batch_size, batch_rounds=dynamic, **extra)
    raise ValueError(f"unknown policy {config.policy!r}")
