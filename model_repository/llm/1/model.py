"""Triton glue for the LLM: parse tensors, hand requests to the engine thread, send responses."""

import logging
import os
import signal
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from ssjf.config import EngineConfig, RefreshConfig
from ssjf.engine import Engine
from ssjf.metrics import TritonMetrics
from ssjf.proxy.learner import Refresher
from ssjf.request import RequestError
from ssjf.responder import Responder
from ssjf.server import DrainSignal, exit_with_parent
from ssjf.serving import LLM_INPUTS, check_parameters, model_parameters, parse_llm_inputs


class TritonSink:
    """Sends a request's outputs through its decoupled response sender. After the final response it
    lets go of Triton's objects: a finished Request that lingers (the rank window, a cycle) must not
    free a Triton request after the stub has torn down its shared memory (a crash at unload)."""

    def __init__(self, request, inputs=None):
        self.request = request
        self.sender = request.get_response_sender()
        self.predicted = np.array([[(inputs and inputs.predicted_length) or 0]], dtype=np.int32)
        self.reasons = inputs is not None and inputs.return_finish_reason
        self.counts = inputs is not None and inputs.return_num_output_tokens

    def send(self, text: str, final: bool, tokens: int = 0, reason: str | None = None) -> None:
        out = [
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("predicted_length", self.predicted),
        ]
        if self.reasons:  # vLLM's words: a context that filled up ends at "length" too
            word = "length" if reason == "context" else (reason or "")
            out.append(pb_utils.Tensor("finish_reason", np.array([[word.encode()]], dtype=np.object_)))
        if self.counts:
            out.append(pb_utils.Tensor("num_output_tokens", np.array([[tokens]], dtype=np.uint32)))
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            self.sender.send(pb_utils.InferenceResponse(output_tensors=out), flags=flags)
        finally:
            if final:
                self.request = self.sender = None

    def error(self, message: str) -> None:
        try:
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
                             flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            self.request = self.sender = None

    def is_cancelled(self) -> bool:
        return self.request is not None and self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        params = model_parameters(args)
        self.config = EngineConfig.from_strings(params)
        self.responder = Responder()  # sends, cancellation checks and metric updates, off the engine thread
        self.metrics = TritonMetrics(pb_utils, self.config.policy, run=self.responder.put)
        self.engine = Engine(self.config, metrics=self.metrics, on_death=self._engine_died)
        self.refresher = None
        refresh = RefreshConfig.from_strings(params)
        if refresh.enabled:  # learn the proxy's correction from true lengths (ssjf.proxy.learner)
            self.refresher = Refresher(refresh.file, refresh.window, refresh.interval_s, refresh.min_rows,
                                       on_refit=self.metrics.refit).start()
            self.engine.finished_hooks.append(self._learn)
        self.engine.start()
        exit_with_parent()
        self.unloading = threading.Event()
        if self.config.drain_file:  # ssjf serve's graceful shutdown (ssjf.server.Supervisor)
            DrainSignal(self.config.drain_file).watch(self._drain, self.unloading)
        logging.getLogger("ssjf").info("llm ready: policy=%s batching=%s", self.config.policy, self.config.batching)

    def execute(self, requests):
        for request in requests:
            arrived = time.monotonic()  # server-side latencies start here, tokenization included
            sink = None
            try:
                arrays = {}
                for name in LLM_INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    arrays[name] = None if tensor is None else tensor.as_numpy()
                inputs = parse_llm_inputs(arrays)
                sink = TritonSink(request, inputs)
                check_parameters(request.parameters())
                self.engine.submit(inputs, self.responder.wrap(sink), request_id=request.request_id() or "",
                                   arrival_time=arrived, timeout_s=request.timeout() / 1e6)  # µs; 0: none
            except RequestError as exc:
                self.metrics.rejected(exc.field)
                self._refuse(request, sink, str(exc))
            except Exception as exc:  # a request that breaks something unforeseen fails alone, with its reason
                logging.getLogger("ssjf").exception("request %s: refused", request.request_id())
                self.metrics.rejected("internal")
                self._refuse(request, sink, f"internal error: {type(exc).__name__}: {exc}")
        return None

    @staticmethod
    def _refuse(request, sink, message: str) -> None:
        try:
            (sink or TritonSink(request)).error(message)
        except Exception:  # its sender is already used (an error after the first send): nothing left to tell
            logging.getLogger("ssjf").warning("request %s: the error could not be sent", request.request_id())

    def _learn(self, req) -> None:
        if req.features is not None and req.finish_reason in ("stop", "length"):
            self.refresher.observe(req.features, len(req.output_ids))

    def _engine_died(self, exc: BaseException) -> None:
        """The engine gave up after max_engine_restarts crashes. Triton 2.51 has no call that marks a
        Python model not-ready, so stop the server gracefully (SIGTERM to tritonserver, our parent):
        /v2/health/ready turns false at once and the orchestrator (compose restart policy, a k8s
        probe) brings up a fresh one. Requests already failed with an error; none hangs."""
        logging.getLogger("ssjf").critical("engine died (%s); stopping tritonserver so it is restarted", exc)
        parent = os.getppid()
        try:
            is_triton = b"tritonserver" in open(f"/proc/{parent}/cmdline", "rb").read()
        except OSError:
            is_triton = False
        # never signal anything else (an orphaned stub's parent is init)
        if self.config.exit_on_engine_death and is_triton:
            os.kill(parent, signal.SIGTERM)

    def _drain(self, seconds_left: float) -> None:
        logging.getLogger("ssjf").info("shutting down: requests in flight have %.0f s to finish", seconds_left)
        self.engine.drain(seconds_left)

    def finalize(self):
        self.unloading.set()
        self.engine.stop()
        if self.refresher is not None:
            self.refresher.stop()
        self.responder.stop()  # the final responses the engine queued while stopping
        self.metrics.close()
