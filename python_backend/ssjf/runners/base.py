"""The seam between the engine and batched generation.

The engine owns the queue, admission, streaming, deadlines and cancellation; a runner owns
the weights and the KV cache (which rows or blocks a running request holds). Per step the
engine calls `admit` with the requests the scheduler just let in, then `step` with every
running request; each returns the tokens each request got. When a request leaves the batch
for any reason the engine calls `release`, and the runner frees what it held; when one is
preempted (ssrpt) the engine calls `preempt`, and the runner may keep its cache until it is
admitted again.

Runners (`ssjf.runners.make_runner` picks one by name): `torch` (runners/torch: our own forward
pass over a static cache, no dependencies beyond transformers) and `vllm` (runners/vllm.py:
vLLM's v1 engine, its paged attention and kernels, stepped from the engine thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..request import Request


@dataclass
class StepOutput:
    """What one admit() or step() produced."""

    tokens: list[tuple[Request, list[int]]] = field(default_factory=list)  # new tokens, in order
    failed: list[tuple[Request, Exception]] = field(default_factory=list)  # requests that must end with an error
    stopped: list[Request] = field(default_factory=list)  # requests the runner itself ended (its own stop rule)
    resumed: list[Request] = field(default_factory=list)  # admitted from a kept cache (no prefill, no token yet)


class Runner(Protocol):
    tokenizer: object
    max_seq_len: int  # prompt + output tokens per request
    eos_token_ids: set[int]

    def admit(self, reqs: list[Request]) -> StepOutput:
        """Take newly scheduled requests into the batch (their prefill may happen here or in step)."""

    def step(self, reqs: list[Request]) -> StepOutput:
        """One decode step for every running request in reqs."""

    def release(self, req: Request) -> None:
        """req has left the batch (finished, cancelled, failed), or ended while it waited after a
        preemption: free whatever it held; never raises, and a second call does nothing."""

    def preempt(self, req: Request) -> None:
        """req gave its batch place back and will be admitted again with its prompt plus what it
        generated. The runner frees the place; it may keep the cache so that admit() resumes req
        without a prefill (listed in StepOutput.resumed), or free it as release() does."""
