"""Triton-facing helpers that need no Triton: parameters, input parsing and validation.

model.py files fetch tensors as numpy arrays and call these; every problem becomes a
RequestError whose message starts with the offending field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from .engine import RequestError

LLM_INPUTS = ("text_input", "predicted_length", "max_tokens", "ignore_eos", "stream", "temperature")


def model_parameters(args: dict) -> dict[str, str]:
    """The string parameters of a model's config.pbtxt, from initialize()'s args."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


@dataclass
class LLMInputs:
    text: str
    max_tokens: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    temperature: float = 0.0
    predicted_length: int | None = None


def _scalar(name: str, array: np.ndarray | None):
    if array is None:
        return None
    if array.size != 1:
        raise RequestError(f"{name}: expected one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def decode_text(value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"text_input: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(value, str):
        return value
    raise RequestError(f"text_input: expected a string, got {type(value).__name__}")


def check_parameters(parameters: str | dict | None) -> None:
    """Request parameters (JSON from Triton; the generate endpoint puts unknown body fields there).
    This model takes none: a misspelt field would otherwise be dropped without a word."""
    params = json.loads(parameters) if isinstance(parameters, str) else (parameters or {})
    if params:
        raise RequestError(
            f"parameters: unknown request parameter(s) {', '.join(sorted(map(repr, params)))}; "
            f"the inputs are {', '.join(n for n in LLM_INPUTS if n != 'predicted_length')}"
        )


def parse_llm_inputs(arrays: dict[str, np.ndarray | None], max_prompt_bytes: int = 0) -> LLMInputs:
    """Validate and convert one request's input tensors."""
    text = _scalar("text_input", arrays.get("text_input"))
    if text is None:
        raise RequestError("text_input: missing")
    size = len(text) if isinstance(text, (bytes, np.bytes_, str)) else 0
    if max_prompt_bytes and size > max_prompt_bytes:
        raise RequestError(f"text_input: {size} bytes is over the limit of {max_prompt_bytes} (max_prompt_bytes)")
    parsed = LLMInputs(text=decode_text(text))
    if not parsed.text.strip():
        raise RequestError("text_input: the prompt is empty")
    for name in ("max_tokens", "predicted_length"):
        value = _scalar(name, arrays.get(name))
        if value is not None:
            if not np.issubdtype(np.asarray(value).dtype, np.integer):
                raise RequestError(f"{name}: expected an integer, got {value!r}")
            setattr(parsed, name, int(value))
    for name in ("ignore_eos", "stream"):
        value = _scalar(name, arrays.get(name))
        if value is not None:
            setattr(parsed, name, bool(value))
    temperature = _scalar("temperature", arrays.get("temperature"))
    if temperature is not None:
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise RequestError(f"temperature: must be a finite number >= 0, got {temperature}")
        parsed.temperature = temperature
    if parsed.predicted_length is not None and parsed.predicted_length < 1:
        parsed.predicted_length = None  # a broken prediction falls back to the unknown-length key
    return parsed
