"""Triton glue for the proxy: one encoder pass over every prompt the dynamic batcher grouped."""

import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ssjf.cpus import bind_process, service_cpus
from ssjf.proxy import LengthPredictor
from ssjf.serving import model_parameters


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        threads = params.get("num_threads", "auto")
        if threads == "auto" and params.get("device", "cpu") == "cpu":
            cpus = service_cpus()  # off the engine's cores (ssjf.cpus)
            bind_process(cpus)
            torch.set_num_threads(len(cpus))
        elif threads != "auto" and int(threads) > 0:
            torch.set_num_threads(int(threads))
        self.failed_once = False
        # SSJF_PROXY_ARTIFACT overrides the config (trace replay serves the `recorded` artifact)
        artifact = os.environ.get("SSJF_PROXY_ARTIFACT") or params.get("artifact", "smollm2")
        self.predictor = LengthPredictor(artifact, params.get("device", "cpu"))
        self.predictor.encoder.warm_up()  # every prompt width once, so first requests are not slow

    def execute(self, requests):
        texts, counts = [], []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
            texts.extend(r.decode("utf-8", errors="replace") if isinstance(r, bytes) else str(r) for r in rows)
            counts.append(len(rows))
        try:
            predicted = self.predictor.predict(texts)
        except Exception as exc:  # 0 means "unknown": the LLM queue serves these with its fallback key
            if not self.failed_once:
                pb_utils.Logger.log_error(f"length_predictor failed, falling back: {exc}")
                self.failed_once = True
            predicted = np.zeros(len(texts), np.int32)
        responses, start = [], 0
        for n in counts:
            out = pb_utils.Tensor("predicted_length", predicted[start : start + n].reshape(n, 1))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += n
        return responses
