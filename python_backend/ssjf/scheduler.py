"""Scheduler: the waiting queue (ordered by the policy) and the running batch.

Ordering is the policy's (policy.py); admission, how many requests fit in the batch
this step, is `Admission`'s. Batching modes differ only in when admission happens:
  continuous: every step, into any free slot (requests join and leave mid-flight);
  dynamic:    only when the running batch has drained (request-level batches);
  none:       one request at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .config import PREEMPTIVE, EngineConfig
from .policy import make_queue
from .request import Request, RequestStatus


@dataclass
class Preemption:
    """When a running job gives its batch place back (ssrpt): the batch is full, the best waiting
    job's expected remaining length is `margin` times shorter than a running job's (or its priority
    class is higher), that job is not past `max_fraction` of its expected length, and it has been
    preempted fewer than `max_times` times. It keeps its tokens and its stream; it comes back with
    its prompt plus what it generated, as a waiting job keyed by its expected remaining length."""

    margin: float
    max_fraction: float
    max_times: int

    def victim(self, candidate: Request, running: list[Request], key) -> Request | None:
        left = {r.seq: key(r) for r in running if not r.is_done}  # each key once: they are log-normal tails
        want = key(candidate)
        if not left or min(left.values()) <= want:
            return None  # a place frees before the candidate could have finished: waiting costs it little
        victims = [r for r in running if r.seq in left and r.preemptions < self.max_times
                   and r.priority >= candidate.priority
                   and len(r.output_ids) <= self.max_fraction * (len(r.output_ids) + left[r.seq])]
        if not victims:
            return None
        worst = max(victims, key=lambda r: (r.priority, left[r.seq]))
        if worst.priority > candidate.priority or want * self.margin < left[worst.seq]:
            return worst
        return None


@dataclass
class Admission:
    """How many waiting requests fit: batch slots, and a padded prefill-token budget per step."""

    max_running: int
    max_prefill_tokens: int

    def fits(self, req: Request, num_running: int, admitted: list[Request]) -> bool:
        if num_running + len(admitted) >= self.max_running:
            return False
        if not admitted:
            return True  # a single prompt is always admitted (the engine bounds prompt length)
        width = max(req.context_len, max(r.context_len for r in admitted))
        return width * (len(admitted) + 1) <= self.max_prefill_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic):
        self.batching = config.batching
        self.waiting = make_queue(config, clock)
        self.running: list[Request] = []  # in admission order; the runner owns their cache places
        self.admission = Admission(config.max_batch_size, config.max_prefill_tokens)
        self.preemption = (Preemption(config.preempt_margin, config.preempt_max_fraction, config.max_preemptions)
                           if config.policy in PREEMPTIVE and config.batching == "continuous" and config.preempt_margin > 0
                           and config.max_preemptions > 0 else None)
        self.preempted: list[Request] = []  # by the last schedule(): the engine frees their cache places

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.add(req)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def schedule(self) -> list[Request]:
        """Admit waiting requests into free slots in policy order; returns those admitted."""
        if self.batching == "dynamic":
            if self.running:
                return []
            self.waiting.new_round()
        self.preempted = self._preempt()
        admitted: list[Request] = []
        while self.waiting and self.admission.fits(self.waiting.peek(), len(self.running), admitted):
            admitted.append(self.waiting.pop())
        for req in admitted:
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        return admitted

    def _preempt(self) -> list[Request]:
        """At most one running job gives its place back per step (so recompute stays bounded)."""
        if (self.preemption is None or len(self.running) < self.admission.max_running or not self.waiting
                or not self.waiting.trusts_estimates()):
            return []
        candidate = self.waiting.peek()
        victim = self.preemption.victim(candidate, self.running, self.waiting.remaining)
        if victim is None:
            return []
        self.running.remove(victim)
        victim.preemptions += 1
        victim.preempted_at.append((len(victim.output_ids), float(self.waiting.remaining(victim))))
        self.add(victim)
        return [victim]

    def observe(self, req: Request) -> None:
        """A request ended: the policy learns from its true length (ssrpt's spread)."""
        if req.finish_reason in ("stop", "length"):
            self.waiting.observe(req)

    def retire(self, req: Request) -> None:
        """Take a request out of the running batch."""
        self.running.remove(req)

    def remove_waiting(self, req: Request) -> bool:
        return self.waiting.remove(req)
