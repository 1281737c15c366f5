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
import time
from typing import Callable, Iterator

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


class FCFSQueue(RequestQueue):
    """First come, first served."""

    def __init__(self):
        self._q: collections.deque[Request] = collections.deque()

    def add(self, req: Request) -> None:
        self._q.append(req)

    def peek(self) -> Request:
        if not self._q:
            raise IndexError("peek from an empty queue")
        return self._q[0]

    def pop(self) -> Request:
        if not self._q:
            raise IndexError("pop from an empty queue")
        return self._q.popleft()

    def remove(self, req: Request) -> bool:
        try:
            self._q.remove(req)
            return True
        except ValueError:
            return False

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._q))


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
        self._heap: list[tuple[float, int, Request]] = []
        self._fifo: collections.deque[Request] = collections.deque()
        self._live: dict[int, Request] = {}  # seq -> request; heap and fifo entries not here are stale

    def sort_key(self, req: Request) -> float:
        raise NotImplementedError

    def add(self, req: Request) -> None:
        self._live[req.seq] = req
        heapq.heappush(self._heap, (self.sort_key(req), req.seq, req))
        self._fifo.append(req)

    def _oldest(self) -> Request | None:
        while self._fifo and self._fifo[0].seq not in self._live:
            self._fifo.popleft()
        return self._fifo[0] if self._fifo else None

    def _shortest(self) -> Request | None:
        while self._heap and self._heap[0][1] not in self._live:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

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
        if self._passed_over:  # the relative bound can starve a younger request first: the oldest of those
            return self._live[min(self._passed_over)]
        return self._shortest()

    def pop(self) -> Request:
        req = self.peek()
        del self._live[req.seq]
        self._forget(req)
        if self.max_passes > 0 or self.max_bypass_ratio > 0:
            steps = self.sort_key(req) / self.slots
            for seq in self._live:  # everyone who arrived earlier was passed over once more
                if seq < req.seq:
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
        self._passed_over.discard(req.seq)
        self._passes.pop(req.seq, None)
        self._held_up.pop(req.seq, None)
        self._round.pop(req.seq, None)

    def remove(self, req: Request) -> bool:
        self._forget(req)
        return self._live.pop(req.seq, None) is not None

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        starving = [r for r in self._live.values() if self.is_starving(r)]
        starving.sort(key=lambda r: (r.arrival_time, r.seq))
        rest = [r for r in self._live.values() if not self.is_starving(r)]
        rest.sort(key=lambda r: (self.sort_key(r), r.seq))
        return iter(starving + rest)


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
    if config.policy in ("ssjf", "sjf_oracle"):
        dynamic = config.batching == "dynamic"
        cls = SSJFQueue if config.policy == "ssjf" else OracleSJFQueue
        return cls(starvation_s=config.starvation_s, clock=clock, max_passes=config.max_passes,
                   max_bypass_ratio=config.max_bypass_ratio, cap_by_max_tokens=config.cap_by_max_tokens,
                   slots=1 if dynamic else config.max_batch_size, batch_rounds=dynamic)
    raise ValueError(f"unknown policy {config.policy!r}")
