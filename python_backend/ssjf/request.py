"""Request state: one dataclass with a status enum."""

from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

_arrivals = itertools.count()


class RequestError(ValueError):
    """A request that cannot be served as asked. Its message starts with the field at fault
    ("max_tokens: must be >= 1"); `field` is that name ("queue full", "server shutting down" and
    other messages about the server, not a field, give theirs whole before any colon)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field or message.split(":", 1)[0].split("[", 1)[0]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"  # stopped at EOS, max_tokens or the context limit
    ABORTED = "aborted"  # cancelled by the client
    FAILED = "failed"  # ended with an error


class Sink(Protocol):
    """Where a request's output goes (a Triton response sender, or a list in tests). Each send
    carries the output tokens its text covers since the last send, and the final one the finish
    reason ("stop", "length" or "context")."""

    def send(self, text: str, final: bool, tokens: int = 0, reason: str | None = None) -> None: ...

    def error(self, message: str) -> None: ...

    def is_cancelled(self) -> bool: ...


class NullSink:
    """A sink that keeps nothing (benchmarks, profiling, the simulator): the Request holds the tokens."""

    def send(self, text: str, final: bool, tokens: int = 0, reason: str | None = None) -> None: ...

    def error(self, message: str) -> None: ...

    def is_cancelled(self) -> bool:
        return False


@dataclass
class Sampling:
    """How each next token is chosen, carried whole from the client's inputs to the runner."""

    temperature: float = 0.0  # 0 (or below 1e-5): greedy
    top_p: float = 1.0  # nucleus: sample among the most likely tokens whose probability reaches top_p
    top_k: int = 0  # sample among the k most likely tokens; 0: all
    seed: int | None = None  # the same seed, prompt and model give the same tokens

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5  # below that, logits / T overflow

    def check(self) -> None:
        """Every value check of the sampling inputs, each error naming its field."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature: must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k: must be >= 0 (0: every token), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RequestError(f"seed: must be in [0, 2**63), got {self.seed}")


MAX_STOPS = 4  # stop strings per request (as OpenAI's API)
MAX_STOP_CHARS = 256  # each; the detokenizer holds back up to this many characters less one


def check_stops(stops: list[str]) -> None:
    """The stop strings' value checks, each error naming the field."""
    if len(stops) > MAX_STOPS:
        raise RequestError(f"stop: at most {MAX_STOPS} strings, got {len(stops)}")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError(f"stop: each string must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")


@dataclass
class LLMInputs:
    """What a client sent, converted from its tensors but not yet validated (Engine.submit does that)."""

    text: str
    max_tokens: int | None = None  # None: the engine's default
    ignore_eos: bool = False
    stream: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    predicted_length: int | None = None  # the proxy's; < 1 means it had none
    text_bytes: int = 0  # the prompt's size as sent, for max_prompt_bytes
    features: Any = None  # the proxy's features (numpy, float32), for the proxy refresh (learner.py)
    messages: list[dict[str, str]] | None = None  # a conversation (text is then its last user turn)
    priority: int = 0  # the client's class: lower first
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these
    return_finish_reason: bool = False  # each response carries `finish_reason` (as Triton's vllm_backend)
    return_num_output_tokens: bool = False  # each response carries `num_output_tokens`: the tokens it covers

    def __post_init__(self):
        if not self.text_bytes:
            self.text_bytes = len(self.text.encode("utf-8", errors="replace"))

    @property
    def temperature(self) -> float:
        return self.sampling.temperature


@dataclass(eq=False)  # a request is itself: `in` and `remove` compare identity, never field by field
class Request:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int | None  # None: the engine's default, clamped to the context
    sink: Sink | None = None
    ignore_eos: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = True
    stop: tuple[str, ...] = ()  # stop strings: the output ends before the first (finish_reason "stop")
    predicted_length: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # clock time by which it must end (set by Engine.check)
    seq: int = field(default_factory=lambda: next(_arrivals))  # arrival order, breaks ties
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    text: str = ""  # detokenized output so far
    sent_tokens: int = 0  # output tokens the responses so far covered
    detok: Any = field(default=None, repr=False)  # the engine's IncrementalDetokenizer while it runs
    features: Any = field(default=None, repr=False)  # the proxy's features, when the ensemble sent them
    priority: int = 0  # the client's class: lower is served first; the length key orders within a class
    preemptions: int = 0  # times it gave its batch place back (ssrpt); its tokens and stream stay
    # (tokens generated, expected remaining) when it was preempted: the estimates a preemption acted on,
    # scored against the true remainder when it ends (ssjf_remaining_error_tokens)
    preempted_at: list[tuple[int, float]] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def context_ids(self) -> list[int]:
        """What a runner prefills on admission: the prompt, plus what it generated before a preemption."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def context_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def tokens_left(self) -> int:
        """Output tokens it may still generate."""
        return self.max_tokens - len(self.output_ids)

    @property
    def true_length(self) -> int | None:
        """The output length when it is fixed in advance (ignore_eos runs to max_tokens)."""
        return self.max_tokens if self.ignore_eos else None

    @property
    def is_done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.FAILED)
