"""Responses off the engine thread.

In Triton every send and every cancellation check is an IPC round trip from the stub to the
server process. Done on the engine thread they stall generation once per token per request.
A `Responder` is one thread that does that work instead (as Triton's vllm_backend has a
response thread): the engine hands each piece of output to a `QueuedSink`, which only appends
it to the responder's FIFO queue, so a request's pieces go out in order, the final one last.
Cancellation is polled by the responder too: `is_cancelled()` returns the last answer at once
and asks for a fresh one at most every `poll_s`. A send that fails (the client went away)
marks the sink cancelled, so the engine frees the request's slot at its next check.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from .request import Sink

log = logging.getLogger(__name__)

_STOP = object()


class QueuedSink:
    """A Sink whose work runs on the responder's thread."""

    def __init__(self, responder: "Responder", inner: Sink):
        self.inner = inner
        self._responder = responder
        self._cancelled = False
        self._checked = 0.0  # when a fresh cancellation check was last asked for
        self._checking = False

    def send(self, text: str, final: bool, tokens: int = 0, reason: str | None = None) -> None:
        self._responder.put(self._send, text, final, tokens, reason)

    def error(self, message: str) -> None:
        self._responder.put(self._error, message)

    def is_cancelled(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and not self._checking and now - self._checked >= self._responder.poll_s:
            self._checked, self._checking = now, True
            self._responder.put(self._check)
        return self._cancelled

    # ---- on the responder's thread -------------------------------------------------------
    def _send(self, text: str, final: bool, tokens: int, reason: str | None) -> None:
        try:
            self.inner.send(text, final, tokens, reason)
        except Exception as exc:  # the client is gone: the engine ends the request at its next check
            log.info("send failed (%s); the request will be dropped", exc)
            self._cancelled = True

    def _error(self, message: str) -> None:
        try:
            self.inner.error(message)
        except Exception:
            log.warning("an error response could not be sent", exc_info=True)

    def _check(self) -> None:
        try:
            self._cancelled = self._cancelled or bool(self.inner.is_cancelled())
        finally:
            self._checking = False


class Responder:
    """One thread that runs queued sends and cancellation checks in order."""

    def __init__(self, poll_s: float = 0.05, name: str = "ssjf-responder"):
        self.poll_s = poll_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def wrap(self, sink: Sink) -> QueuedSink:
        return QueuedSink(self, sink)

    def put(self, fn, *args) -> None:
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:  # one request's failure never stops the others' responses
                log.exception("responder: %s failed", getattr(fn, "__name__", fn))

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
