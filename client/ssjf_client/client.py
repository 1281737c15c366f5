"""Streaming client over Triton gRPC: one prompt in, tokens out as they arrive, with
the latencies the client observes (TTFT = first token time - send time; JCT = final
response time - send time)."""

from __future__ import annotations

import json
import queue
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


@dataclass
class GenerateResult:
    text: str = ""
    predicted_length: int | None = None
    ttft_s: float | None = None
    jct_s: float | None = None
    chunks: int = 0
    error: str | None = None
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    output_tokens: int = 0  # tokens generated, as the server counted them

    @property
    def ok(self) -> bool:
        return self.error is None


# The ensemble's inputs and their tensor types (the server states them in ssjf.serving.INPUTS;
# tests/test_serving.py checks that the two agree). A string is sent UTF-8; a list, one per element.
FIELDS = {
    "text_input": (np.object_, "BYTES"),
    "messages": (np.object_, "BYTES"),  # JSON, instead of text_input
    "stream": (bool, "BOOL"),
    "max_tokens": (np.int32, "INT32"),
    "ignore_eos": (bool, "BOOL"),
    "temperature": (np.float32, "FP32"),  # 0: greedy
    "top_p": (np.float32, "FP32"),  # sampling: the nucleus
    "top_k": (np.int32, "INT32"),  # sampling: the k most likely tokens
    "seed": (np.int64, "INT64"),  # sampling: the same seed gives the same tokens
    "priority": (np.int32, "INT32"),  # a class: lower is served first; the length key orders within it
    "stop": (np.object_, "BYTES"),  # up to 4 strings: the text ends before the first of them
    "return_finish_reason": (bool, "BOOL"),  # responses carry finish_reason (as Triton's vllm_backend)
    "return_num_output_tokens": (bool, "BOOL"),  # responses carry num_output_tokens: the tokens each covers
}


def build_inputs(prompt: str | None, max_tokens: int | None = None, ignore_eos: bool | None = None,
                 stream: bool = True, temperature: float | None = None, module=grpcclient,
                 messages: list[dict[str, str]] | None = None, **fields) -> list:
    """The ensemble's input tensors (batch dimension 1): a prompt, or a conversation (`messages`:
    [{"role": "system" | "user" | "assistant", "content": ...}], the last turn the user's), and
    any of FIELDS given as keywords (None: the server's default)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f"build_inputs: unknown input(s) {', '.join(sorted(unknown))}; the inputs are {', '.join(FIELDS)}")
    fields.update(text_input=prompt, messages=None if messages is None else json.dumps(messages), stream=stream,
                  max_tokens=max_tokens, ignore_eos=ignore_eos, temperature=temperature)
    inputs = []
    for name, (dtype, triton_type) in FIELDS.items():
        values = fields.get(name)
        values = [] if values is None else values if isinstance(values, (list, tuple)) else [values]
        if values:
            t = module.InferInput(name, [1, len(values)], triton_type)
            t.set_data_from_numpy(np.array([[v.encode("utf-8") if isinstance(v, str) else v for v in values]], dtype=dtype))
            inputs.append(t)
    return inputs


# what a gRPC stream reports when the server (or a balancer's replica) went away mid-request
LOST = ("RST_STREAM", "Stream removed", "status: 502", "status: 503", "Socket closed", "Connection reset",
        "failed to connect")


def explain(message: str) -> str:
    """The server's error as is; a transport error says that the connection was lost, so the
    request may be retried (on another replica behind a balancer), then gives gRPC's own words."""
    if any(mark in message for mark in LOST):
        return f"connection to the server lost before the request finished (retry it): {message}"
    return message


class SSJFClient:
    """One gRPC stream to the server; generate() calls run one after another on it."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str = "ssjf"):
        self.model = model
        self.client = grpcclient.InferenceServerClient(url)
        self._responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self._responses.put((result, error, time.perf_counter())))

    def close(self) -> None:
        try:
            self.client.stop_stream(cancel_requests=True)
        finally:
            self.client.close()

    def __enter__(self) -> "SSJFClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str | None, max_tokens: int | None = None, ignore_eos: bool | None = None,
                 stream: bool = True, temperature: float | None = None, timeout: float = 600.0,
                 on_text: Callable[[str], None] | None = None, deadline_s: float | None = None,
                 messages: list[dict[str, str]] | None = None, **fields) -> GenerateResult:
        """One request: a prompt, or (prompt None) a conversation in `messages`, and any of FIELDS
        (priority, top_p, top_k, seed, stop) as keywords; `timeout` bounds the wait here,
        `deadline_s` is sent to the server, which ends the request with a "deadline exceeded"
        error once it has run that long (ensemble included)."""
        result = GenerateResult()
        fields = {"return_finish_reason": True, "return_num_output_tokens": True, **fields}
        start = time.perf_counter()
        self.client.async_stream_infer(
            self.model, build_inputs(prompt, max_tokens, ignore_eos, stream, temperature, messages=messages, **fields),
            enable_empty_final_response=True, timeout=int(deadline_s * 1e6) if deadline_s else None,
        )
        deadline = start + timeout
        while True:
            try:
                response, error, at = self._responses.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                result.error = f"no final response within {timeout:.0f}s"
                return result
            if error is not None:
                result.error = explain(error.message() if isinstance(error, InferenceServerException) else str(error))
                result.jct_s = at - start
                return result
            piece = response.as_numpy("text_output")
            if piece is not None and piece.size:
                text = piece.reshape(-1)[0].decode("utf-8")
                if text:
                    result.chunks += 1
                    if result.ttft_s is None:
                        result.ttft_s = at - start
                    result.text += text
                    if on_text:
                        on_text(text)
                predicted = response.as_numpy("predicted_length")
                if predicted is not None:
                    result.predicted_length = int(predicted.reshape(-1)[0])
            reason, tokens = response.as_numpy("finish_reason"), response.as_numpy("num_output_tokens")
            if reason is not None and reason.reshape(-1)[0]:
                result.finish_reason = reason.reshape(-1)[0].decode()
            result.output_tokens += 0 if tokens is None else int(tokens.reshape(-1)[0])
            final = response.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                result.jct_s = at - start
                return result


def scrape_metrics(metrics_url: str, prefix: str = "ssjf_") -> dict[str, float]:
    """Triton's Prometheus text at `metrics_url` (http://host:port) as {'name{labels}': value},
    the series whose name starts with `prefix`."""
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def metric_total(values: dict[str, float], name: str) -> float:
    """One metric summed over its label sets, from scrape_metrics' {'name{labels}': value}."""
    return sum(v for k, v in values.items() if k.split("{", 1)[0] == name)
