"""Triton-facing helpers that need no Triton: a model's parameters, and one request's input
tensors converted to Python values (LLMInputs).

Conversion only: shapes, types and UTF-8. What the values may be (an empty prompt, a negative
temperature, a prompt too long for the context, the proxy's "no prediction") is Engine.submit's
to decide, once. Every problem is a RequestError whose message starts with the offending field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from .request import LLMInputs, RequestError


@dataclass(frozen=True)
class Input:
    """One input of the llm model: its name (also the LLMInputs field it fills), its Triton type
    (config.pbtxt's TYPE_<type>), how its value converts, and whether a client sends it (else the
    ensemble's proxy step adds it). Both config.pbtxt files, the ensemble's maps and the client's
    tensors are checked against this table (tests/test_serving.py)."""

    name: str
    triton_type: str
    kind: str  # text | strings | int | bool | float | features
    client: bool = True
    dims: int = 1
    sampling: bool = False  # a field of LLMInputs.sampling (request.Sampling), not of LLMInputs

    @property
    def wire_type(self) -> str:
        """Its datatype on the wire, as tritonclient names it (config.pbtxt's STRING is BYTES)."""
        return "BYTES" if self.triton_type == "STRING" else self.triton_type

    @property
    def numpy(self):
        """The numpy dtype a client's tensor of it has."""
        return NUMPY[self.triton_type]


INPUTS = (
    Input("text_input", "STRING", "text"),
    Input("messages", "STRING", "text"),  # JSON [{"role": ..., "content": ...}], instead of text_input
    Input("predicted_length", "INT32", "int", client=False),
    Input("max_tokens", "INT32", "int"),
    Input("ignore_eos", "BOOL", "bool"),
    Input("stream", "BOOL", "bool"),
    Input("temperature", "FP32", "float", sampling=True),
    Input("top_p", "FP32", "float", sampling=True),
    Input("top_k", "INT32", "int", sampling=True),
    Input("seed", "INT64", "int", sampling=True),
    Input("priority", "INT32", "int"),
    Input("stop", "STRING", "strings", dims=-1),  # stop strings, one per element
    Input("return_finish_reason", "BOOL", "bool"),  # the outputs vllm_backend adds when asked
    Input("return_num_output_tokens", "BOOL", "bool"),
    Input("proxy_features", "FP32", "features", client=False, dims=-1),
)
LLM_INPUTS = tuple(i.name for i in INPUTS)
# the outputs, both models alike: the text, the proxy's prediction, and what return_* asks for
OUTPUTS = (("text_output", "STRING"), ("predicted_length", "INT32"), ("finish_reason", "STRING"),
           ("num_output_tokens", "UINT32"))
INTERNAL = tuple(i.name for i in INPUTS if not i.client)  # what the ensemble's proxy step adds
ROLES = ("system", "user", "assistant")


def _integer(name: str, value) -> int:
    if not np.issubdtype(np.asarray(value).dtype, np.integer):
        raise RequestError(f"{name}: expected an integer, got {value!r}")
    return int(value)


NUMPY = {"STRING": np.object_, "INT32": np.int32, "INT64": np.int64, "BOOL": bool, "FP32": np.float32}
CONVERT = {"int": _integer, "bool": lambda name, value: bool(value), "float": lambda name, value: float(value)}


def model_parameters(args: dict) -> dict[str, str]:
    """The string parameters of a model's config.pbtxt, from initialize()'s args."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _scalar(name: str, array: np.ndarray | None):
    if array is None:
        return None
    if array.size != 1:
        raise RequestError(f"{name}: expected one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def decode_text(value, name: str = "text_input") -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(value, str):
        return value
    raise RequestError(f"{name}: expected a string, got {type(value).__name__}")


def check_parameters(parameters: str | dict | None) -> None:
    """Request parameters (JSON from Triton; the generate endpoint puts unknown body fields there).
    This model takes none: a misspelt field would otherwise be dropped without a word."""
    params = json.loads(parameters) if isinstance(parameters, str) else (parameters or {})
    if params:
        raise RequestError(
            f"parameters: unknown request parameter(s) {', '.join(sorted(map(repr, params)))}; "
            f"the inputs are {', '.join(n for n in LLM_INPUTS if n not in INTERNAL)}"
        )


MAX_MESSAGES_BYTES = 1 << 20  # a conversation's JSON; its prompt is bounded again by max_prompt_bytes
MAX_JSON_DEPTH = 8  # a list of objects of strings needs 2
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(text: str) -> int:
    """How deep JSON text nests its lists and objects, found without recursion (strings skipped)."""
    brackets = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "replace"), np.uint8)
    steps = np.isin(brackets, (ord("["), ord("{"))).astype(np.int32) - np.isin(brackets, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def parse_messages(raw) -> list[dict[str, str]]:
    """The `messages` input: a JSON list of {"role", "content"} turns, the last one the user's.
    Size and nesting are bounded before the JSON parser (which recurses) sees it."""
    text = decode_text(raw, "messages")
    if len(text) > MAX_MESSAGES_BYTES:
        raise RequestError(f"messages: {len(text)} characters is over the limit of {MAX_MESSAGES_BYTES}")
    if json_depth(text) > MAX_JSON_DEPTH:
        raise RequestError(f"messages: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        turns = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise RequestError(f"messages: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(turns, list) or not turns:
        raise RequestError("messages: expected a non-empty JSON list of {\"role\", \"content\"} objects")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or set(turn) - {"role", "content"} or "role" not in turn or "content" not in turn:
            raise RequestError(f"messages[{i}]: expected an object with exactly \"role\" and \"content\"")
        if turn["role"] not in ROLES:
            raise RequestError(f"messages[{i}].role: {turn['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise RequestError(f"messages[{i}].content: expected a string")
        try:
            turn["content"].encode("utf-8")
        except UnicodeEncodeError as exc:  # a JSON escape such as \ud800 decodes to a lone surrogate
            raise RequestError(f"messages[{i}].content: not valid Unicode ({exc.reason} at {exc.start})") from None
    if turns[-1]["role"] != "user":
        raise RequestError("messages: the last turn must be the user's (the model answers it)")
    return turns


def prompt_of(messages: list[dict[str, str]]) -> str:
    """What the proxy reads of a conversation: its last user turn."""
    return messages[-1]["content"]


def parse_llm_inputs(arrays: dict[str, np.ndarray | None]) -> LLMInputs:
    """One request's input tensors as Python values."""
    text = _scalar("text_input", arrays.get("text_input"))
    raw_messages = _scalar("messages", arrays.get("messages"))
    if text is not None and raw_messages is not None:
        raise RequestError("messages: send text_input or messages, not both")
    if raw_messages is not None:
        messages = parse_messages(raw_messages)
        size = len(raw_messages) if isinstance(raw_messages, (bytes, np.bytes_)) else 0
        parsed = LLMInputs(text=prompt_of(messages), text_bytes=size, messages=messages)
    elif text is None:
        raise RequestError("text_input: missing (send text_input, or messages for a conversation)")
    else:
        size = len(text) if isinstance(text, (bytes, np.bytes_)) else 0
        parsed = LLMInputs(text=decode_text(text), text_bytes=size)
    for spec in INPUTS:
        if spec.kind in CONVERT:
            value = _scalar(spec.name, arrays.get(spec.name))
            if value is not None:
                setattr(parsed.sampling if spec.sampling else parsed, spec.name, CONVERT[spec.kind](spec.name, value))
    stop = arrays.get("stop")
    if stop is not None:
        parsed.stop = [decode_text(s, "stop") for s in np.asarray(stop).reshape(-1)]
    features = arrays.get("proxy_features")
    if features is not None and features.size > 1:  # one column: the proxy had none for this prompt
        parsed.features = np.asarray(features, dtype=np.float32).reshape(-1)
    return parsed
