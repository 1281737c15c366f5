"""The engine: one thread that owns the scheduler and the model runner.

Life of a request:
  1. submit() (the one admission path, on the caller's thread) validates what the client sent,
     applies the defaults, tokenizes, bounds the queue and hands it to the engine thread (a
     thread-safe inbox); add_request() does the same for a request already tokenized.
  2. step(): cancelled requests leave; the scheduler admits waiting requests in policy
     order into the free batch places; the runner admits them (runner.py), then every
     running request gets its next token from the runner's step.
  3. postprocess: each new token is detokenized incrementally and sent to the request's
     sink (a delta per step when streaming, the whole text at the end otherwise).
  4. finished requests are retired: they leave the batch and the runner frees their cache.
Every request ends with exactly one final send or one error.

Faults stay as small as they can: a runner reports the requests a failed forward pass must
fail (the torch runner retries a failed batch one request at a time, so only the request that
fails alone gets an error), and the others go on; a request past its deadline
ends with an error; a crash of the loop itself fails what is in flight and restarts the loop
(up to max_engine_restarts), after which the engine reports dead through on_death.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .metrics import Metrics
from .policy import UNKNOWN_LENGTH
from .request import LLMInputs, Request, RequestError, RequestStatus, check_stops
from .runners import make_runner
from .runners.base import Runner, StepOutput
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig, runner: Runner | None = None, clock=time.monotonic,
                 metrics: Metrics | None = None, on_death=None):
        self.config = config
        self.clock = clock
        self.runner = runner if runner is not None else make_runner(config)
        self.tokenizer = self.runner.tokenizer
        self.max_seq_len = self.runner.max_seq_len
        self.scheduler = Scheduler(config, clock)
        self.generated_tokens = 0
        self.metrics = metrics or Metrics()
        self._inbox: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._drain_until: float | None = None  # set by drain(): admit nothing, end what is left at this time
        self._queued = 0  # waiting in the scheduler, published by the engine thread after each step
        self._next_waiting_scan = 0.0
        self._next_cancel_scan = 0.0
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # set when the engine gave up
        self.crashes = 0
        self.on_death = on_death  # called once, from the engine thread, when it gives up
        self.finished_hooks: list = []  # each called with every request that ends (engine thread; must not block)

    # ---- requests in ---------------------------------------------------------------
    def encode_prompt(self, text: str, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a prompt (one user turn) or a whole conversation, in the model's chat template."""
        if self.config.chat_template and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                messages or [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if messages:
            raise RequestError("messages: this model has no chat template (chat_template is off or missing)")
        return self.tokenizer.encode(text)

    def submit(self, inputs: LLMInputs, sink, *, request_id: str = "", arrival_time: float | None = None,
               timeout_s: float | None = None) -> Request:
        """The one admission path: validate what the client sent (each error names its field),
        apply the defaults, tokenize and queue, once. Runs on the caller's thread (Triton's), so
        tokenization never delays a decode step. Raises RequestError; nothing is queued then."""
        if self.failure is not None:
            raise RequestError(f"engine is not running: {self.failure}")
        if self._stopping or self._drain_until is not None:
            raise RequestError("server shutting down")
        limit = self.config.max_prompt_bytes
        if limit and inputs.text_bytes > limit:
            raise RequestError(f"text_input: {inputs.text_bytes} bytes is over the limit of {limit} (max_prompt_bytes)")
        if not inputs.text.strip():
            raise RequestError("messages: the last user turn is empty" if inputs.messages else "text_input: the prompt is empty")
        inputs.sampling.check()
        check_stops(inputs.stop)
        predicted = inputs.predicted_length
        if predicted is not None and predicted < 1:  # the proxy's "no prediction" (it failed on this prompt)
            self.metrics.proxy_fallback()
            predicted = None
        req = Request(request_id=request_id, prompt_ids=self.encode_prompt(inputs.text, inputs.messages),
                      max_tokens=inputs.max_tokens,
                      sink=sink, ignore_eos=inputs.ignore_eos, sampling=inputs.sampling, stop=tuple(inputs.stop),
                      stream=inputs.stream,
                      predicted_length=predicted, features=inputs.features, priority=inputs.priority,
                      arrival_time=self.clock() if arrival_time is None else arrival_time)
        self.add_request(req, timeout_s)
        return req

    def check(self, req: Request, timeout_s: float | None = None) -> None:
        """Validate against the queue bound and the context; max_tokens None gets the default; the
        deadline is the client's timeout or request_timeout_s, whichever is shorter. Raises RequestError."""
        waiting = len(self._inbox) + self._queued  # counts only: the scheduler is the engine thread's
        if waiting >= self.config.max_waiting:
            raise RequestError(f"queue full: {waiting} requests are waiting (max_waiting={self.config.max_waiting})")
        room = self.max_seq_len - req.prompt_len
        if req.prompt_len == 0:
            raise RequestError("text_input: the prompt is empty")
        if room < 1:
            raise RequestError(
                f"text_input: the prompt has {req.prompt_len} tokens; the context holds {self.max_seq_len}"
            )
        bounds = [t for t in (timeout_s, self.config.request_timeout_s) if t]
        req.deadline = req.arrival_time + min(bounds) if bounds else None
        if req.max_tokens is None:
            req.max_tokens = min(self.config.default_max_tokens, room)
        elif req.max_tokens < 1:
            raise RequestError(f"max_tokens: must be >= 1, got {req.max_tokens}")
        elif req.max_tokens > room:
            raise RequestError(
                f"max_tokens: {req.max_tokens} does not fit: the prompt has {req.prompt_len} tokens "
                f"and the context holds {self.max_seq_len}"
            )

    def add_request(self, req: Request, timeout_s: float | None = None) -> None:
        """Validate a tokenized request (check) and queue it for the engine thread."""
        self.check(req, timeout_s)
        with self._wake:
            self._inbox.append(req)
            self._wake.notify()

    # ---- the thread ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ssjf-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, seconds: float) -> None:
        """Graceful shutdown: admit nothing more; what is queued or running may finish within
        `seconds`, and whatever is left then ends with an error."""
        with self._wake:
            self._drain_until = self.clock() + max(0.0, seconds)
            self._wake.notify()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            try:
                self._serve()
                break  # stopped
            except BaseException as exc:
                self.crashes += 1
                log.exception("engine loop crashed (%d of %d restarts used)", self.crashes, self.config.max_engine_restarts)
                self._fail_all(f"engine error: {exc}")
                if self.crashes > self.config.max_engine_restarts:
                    self.failure = exc  # execute() answers errors while `alive` is false
                    break
                self.scheduler = Scheduler(self.config, self.clock)  # a clean queue; the cache is per slot
        self._fail_all("server shutting down" if self.failure is None else f"engine failed: {self.failure}")
        if self.failure is not None and self.on_death is not None:
            self.on_death(self.failure)

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self.scheduler.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            if self._drain_until is not None and self.clock() >= self._drain_until:
                self._fail_all("server shutting down: the request did not finish within the drain time")
                continue
            self.step()

    def _drain_inbox(self) -> None:
        with self._wake:
            new, self._inbox = list(self._inbox), collections.deque()
        for req in new:
            req.detok = IncrementalDetokenizer(self.tokenizer, req.stop)
            self.scheduler.add(req)

    # ---- one iteration ---------------------------------------------------------------
    def step(self) -> None:
        self._drain_inbox()
        self._scan_waiting()
        self._drop_cancelled(self.scheduler.running)  # frees slots before admission
        admitted = self.scheduler.schedule()
        for req in self.scheduler.preempted:  # back to waiting with its tokens; its batch place is freed
            self.runner.preempt(req)
            self.metrics.preempted(req)
        self._drop_cancelled(admitted)  # a cancelled request is never prefilled
        admitted = [r for r in admitted if not r.is_done]
        new_tokens = 0
        if admitted:
            out = self.runner.admit(admitted)
            for req in admitted:
                if req.output_ids and req not in out.resumed:  # back from a preemption without its cache:
                    self.metrics.recomputed(req.context_len)    # its prompt and what it generated, prefilled again
            new_tokens += self._postprocess(out)
        running = [r for r in self.scheduler.running if not r.is_done]
        if running:
            new_tokens += self._postprocess(self.runner.step(running))
        for req in [r for r in self.scheduler.running if r.is_done]:
            self._retire(req)
        self.generated_tokens += new_tokens
        self._queued = len(self.scheduler.waiting)
        self.metrics.step(self._queued, len(self.scheduler.running), new_tokens)

    def _fail_generation(self, req: Request, exc: Exception) -> None:
        log.error("request %s: generation failed: %s", req.request_id, exc)
        self._finish(req, RequestStatus.FAILED, f"generation failed: {exc}")  # never raises

    def _postprocess(self, out: StepOutput) -> int:
        """Append each request's new tokens, stream or finish it; returns how many tokens were appended."""
        for req, exc in out.failed:
            self._fail_generation(req, exc)
        now = self.clock()
        appended = 0
        for req, tokens in out.tokens:
            for token in tokens:
                if req.is_done:
                    break
                appended += 1
                self._append(req, token, now)
        for req in out.stopped:  # the runner's own stop rule ended it (with or without a last token)
            if not req.is_done:
                self._end(req, "stop", req.detok.flush())
        return appended

    def _append(self, req: Request, token: int, now: float) -> None:
        req.output_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.first_token(req)
        try:
            delta = req.detok.add(token)
        except Exception as exc:  # one request's bad token must not end the others
            self._fail_generation(req, exc)
            return
        reason = None
        if req.detok.stopped or (token in self.runner.eos_token_ids and not req.ignore_eos):  # a stop string, EOS
            reason = "stop"
        elif len(req.output_ids) >= req.max_tokens:
            reason = "length"
        elif req.prompt_len + len(req.output_ids) >= self.max_seq_len:
            reason = "context"
        elif req.deadline is not None and now > req.deadline:
            self._finish(req, RequestStatus.FAILED, self._deadline_message(req, now))
            return
        if reason:
            delta += req.detok.flush()
            self._end(req, "stop" if req.detok.stopped else reason, delta)  # flush may complete a stop string
            return
        req.text += delta
        try:
            if req.stream and delta:
                req.sink.send(delta, final=False, tokens=self._unsent(req))
        except Exception as exc:  # the client went away: free the slot, still try the final flag
            log.info("request %s: send failed (%s); ending it", req.request_id, exc)
            self._finish(req, RequestStatus.ABORTED, f"send failed: {exc}")

    def _end(self, req: Request, reason: str, delta: str) -> None:
        """Finish req normally with its last piece of text."""
        req.text += delta
        req.finish_reason = reason
        self._finish(req, RequestStatus.FINISHED, last_delta=delta)

    @staticmethod
    def _deadline_message(req: Request, now: float) -> str:
        return (f"deadline exceeded: {now - req.arrival_time:.1f} s since arrival, "
                f"{len(req.output_ids)} tokens generated (timeout {req.deadline - req.arrival_time:.1f} s)")

    def _finish(self, req: Request, status: RequestStatus, error: str | None = None, last_delta: str = "") -> None:
        """End a request with its one final send: the last streamed piece, the whole text, or an error.
        Never raises: a client that is gone must not take the engine thread with it."""
        if req.is_done:
            return
        req.status = status
        req.finish_time = self.clock()
        req.detok = None
        self.metrics.finished(req)  # before the final send: a client that sees the end sees the metric
        self.scheduler.observe(req)
        for hook in self.finished_hooks:
            try:
                hook(req)
            except Exception:
                log.exception("a finished-request hook failed")
        try:
            if error is not None:
                req.sink.error(error)
            else:
                req.sink.send(last_delta if req.stream else req.text, final=True, tokens=self._unsent(req),
                              reason=req.finish_reason)
        except Exception:
            log.warning("request %s: the final response could not be sent", req.request_id, exc_info=True)

    @staticmethod
    def _unsent(req: Request) -> int:
        """Output tokens since the last response (held-back text is sent with a later token's)."""
        n, req.sent_tokens = len(req.output_ids) - req.sent_tokens, len(req.output_ids)
        return n

    def _retire(self, req: Request) -> None:
        self.scheduler.retire(req)
        self.runner.release(req)

    def _drop_cancelled(self, running: list[Request]) -> None:
        """Every step: a cancelled running request leaves its slot now."""
        for req in list(running):
            if req.sink.is_cancelled():
                self._finish(req, RequestStatus.ABORTED, "request cancelled")
                self._retire(req)

    def _scan_waiting(self, expiry_s: float = 1.0, cancel_s: float = 10.0) -> None:
        """The waiting queue loses expired requests about once a second (a clock comparison) and
        cancelled ones every `cancel_s`: each cancellation check is an IPC round trip in Triton, and
        the queue can be long. A cancelled request is also caught just before its prefill, so it
        never takes a slot; this scan only frees queue places."""
        now = self.clock()
        if now < self._next_waiting_scan:
            return
        self._next_waiting_scan = now + expiry_s
        check_cancel = now >= self._next_cancel_scan
        if check_cancel:
            self._next_cancel_scan = now + cancel_s
        self.metrics.queued_work(self.queued_work())
        for req in list(self.scheduler.waiting):
            if req.deadline is not None and now > req.deadline:
                if self._unqueue(req):
                    self._finish(req, RequestStatus.FAILED, self._deadline_message(req, now))
            elif check_cancel and req.sink.is_cancelled() and self._unqueue(req):
                self._finish(req, RequestStatus.ABORTED, "request cancelled")

    def _unqueue(self, req: Request) -> bool:
        """Take a waiting request out of the queue; a preempted one may still hold a kept cache."""
        if not self.scheduler.remove_waiting(req):
            return False
        self.runner.release(req)
        return True

    def queued_work(self) -> int:
        """Predicted tokens still to generate here: the waiting requests' predicted lengths plus the
        running ones' predicted remainders (what a router balancing by work reads, per replica)."""
        def left(req: Request) -> int:
            guess = req.predicted_length or UNKNOWN_LENGTH
            if req.max_tokens is not None:
                guess = min(guess, req.max_tokens)
            return max(guess - len(req.output_ids), 0)

        return sum(map(left, [*self.scheduler.waiting, *self.scheduler.running]))

    def _fail_all(self, message: str) -> None:
        """End everything queued or running with an error (the scheduler itself may be broken)."""
        with self._wake:
            inbox, self._inbox = list(self._inbox), collections.deque()
        for req in [*inbox, *list(self.scheduler.running), *list(self.scheduler.waiting)]:
            self._finish(req, RequestStatus.FAILED, message)
        try:
            for req in list(self.scheduler.running):
                self._retire(req)
            for req in list(self.scheduler.waiting):
                self._unqueue(req)
        except Exception:
            log.exception("the scheduler could not be emptied")

    # ---- synchronous use (benchmarks, tests) -------------------------------------------
    @property
    def idle(self) -> bool:
        """Nothing queued, waiting or running."""
        return not self._inbox and not self.scheduler.has_work()

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()
