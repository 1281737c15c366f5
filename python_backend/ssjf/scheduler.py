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

from .config import EngineConfig
from .policy import make_queue
from .request import Request, RequestStatus


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
        width = max(req.prompt_len, max(r.prompt_len for r in admitted))
        return width * (len(admitted) + 1) <= self.max_prefill_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic):
        self.batching = config.batching
        self.waiting = make_queue(config, clock)
        self.running: list[Request] = []  # in admission order; the runner owns their cache places
        self.admission = Admission(config.max_batch_size, config.max_prefill_tokens)

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
        admitted: list[Request] = []
        while self.waiting and self.admission.fits(self.waiting.peek(), len(self.running), admitted):
            admitted.append(self.waiting.pop())
        for req in admitted:
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        return admitted

    def retire(self, req: Request) -> None:
        """Take a request out of the running batch."""
        self.running.remove(req)

    def remove_waiting(self, req: Request) -> bool:
        return self.waiting.remove(req)
