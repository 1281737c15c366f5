"""Triton glue for the proxy: one encoder pass over every prompt the dynamic batcher grouped."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ssjf.config import ProxyConfig
from ssjf.cpus import bind_process, service_cpus
from ssjf.proxy import LengthPredictor
from ssjf.serving import model_parameters


class TritonPythonModel:
    def initialize(self, args):
        config = ProxyConfig.from_strings(model_parameters(args))  # SSJF_PROXY_<FIELD> overrides
        if config.num_threads == "auto" and config.device == "cpu":
            cpus = service_cpus()  # off the engine's cores (ssjf.cpus)
            bind_process(cpus)
            torch.set_num_threads(len(cpus))
        elif config.num_threads != "auto" and int(config.num_threads) > 0:
            torch.set_num_threads(int(config.num_threads))
        self.failed_once = False
        self.predictor = LengthPredictor(config.artifact, config.device, dtype=config.dtype)
        self.predictor.encoder.warm_up()  # every prompt width once, so first requests are not slow
        pb_utils.Logger.log_info(f"length_predictor ready: artifact={config.artifact} "
                                 f"dtype={self.predictor.encoder.dtype_name} threads={torch.get_num_threads()}")

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
