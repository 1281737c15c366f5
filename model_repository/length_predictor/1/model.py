"""Triton glue for the proxy: one encoder pass over every prompt the dynamic batcher grouped."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ssjf.config import EngineConfig, ProxyConfig, RefreshConfig, default_of
from ssjf.cpus import place_proxy
from ssjf.proxy import LengthPredictor
from ssjf.proxy.learner import CorrectionFile
from ssjf.server import exit_with_parent
from ssjf.serving import model_parameters, parse_messages, prompt_of

MAX_PROMPT_CHARS = default_of(EngineConfig, "max_prompt_bytes")  # the encoder reads 128 tokens of it anyway


def prompts(request) -> list[str]:
    """The text the proxy reads: text_input, or a conversation's last user turn, each cut to what the
    llm would accept (max_prompt_bytes). A malformed input still gets a prediction (of ""), and the
    llm answers it with the error; nothing one request sends can fail the batch it was grouped in."""
    try:
        tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
        if tensor is not None:
            return [(r.decode("utf-8", errors="replace") if isinstance(r, bytes) else str(r))[:MAX_PROMPT_CHARS]
                    for r in tensor.as_numpy().reshape(-1)] or [""]
        tensor = pb_utils.get_input_tensor_by_name(request, "messages")
        rows = [] if tensor is None else tensor.as_numpy().reshape(-1)
    except Exception:
        return [""]
    out = []
    for raw in rows:
        try:
            out.append(prompt_of(parse_messages(raw))[:MAX_PROMPT_CHARS])
        except Exception:  # RequestError, and anything a hostile input finds that it does not name
            out.append("")
    return out or [""]


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        config = ProxyConfig.from_strings(params)  # SSJF_PROXY_<FIELD> overrides
        place_proxy(config.num_threads, config.device)  # on a CPU host, off the engine's cores
        exit_with_parent()
        self.failed_once = False
        self.predictor = LengthPredictor(config.artifact, config.device, dtype=config.dtype)
        self.predictor.encoder.warm_up()  # every prompt width once, so first requests are not slow
        # the correction the llm learns from served traffic (ssjf.learner), reloaded when it changes
        refresh = RefreshConfig.from_strings(params)
        self.correction = CorrectionFile(refresh.file) if refresh.enabled else None
        pb_utils.Logger.log_info(f"length_predictor ready: artifact={config.artifact} "
                                 f"dtype={self.predictor.encoder.dtype_name} threads={torch.get_num_threads()}")

    def execute(self, requests):
        texts, counts = [], []
        for request in requests:
            rows = prompts(request)
            texts.extend(rows)
            counts.append(len(rows))
        try:
            if self.correction is not None and self.correction.poll(self.predictor.served_width):
                pb_utils.Logger.log_info(f"length_predictor: correction version {self.correction.version} loaded")
            predicted, features = self.predictor.predict_served(texts, self.correction)
        except Exception as exc:  # 0 means "unknown": the LLM queue serves these with its fallback key
            if not self.failed_once:
                pb_utils.Logger.log_error(f"length_predictor failed, falling back: {exc}")
                self.failed_once = True
            predicted = np.zeros(len(texts), np.int32)
            features = np.zeros((len(texts), 1), np.float32)  # one column: "none" to the llm's learner
        responses, start = [], 0
        for n in counts:
            out = [pb_utils.Tensor("predicted_length", predicted[start : start + n].reshape(n, 1)),
                   pb_utils.Tensor("proxy_features", features[start : start + n])]
            responses.append(pb_utils.InferenceResponse(output_tensors=out))
            start += n
        return responses
