"""Input parsing and validation for the llm model (no Triton needed)."""

import numpy as np
import pytest

from ssjf.engine import RequestError
from ssjf.serving import parse_llm_inputs


def text(s):
    return np.array([[s.encode() if isinstance(s, str) else s]], dtype=np.object_)


def test_defaults_and_values():
    p = parse_llm_inputs({"text_input": text("hi")})
    assert (p.text, p.max_tokens, p.ignore_eos, p.stream, p.temperature) == ("hi", None, False, False, 0.0)
    p = parse_llm_inputs({"text_input": text("hi"), "max_tokens": np.array([[7]], np.int32),
                          "ignore_eos": np.array([[True]]), "stream": np.array([[True]]),
                          "temperature": np.array([[0.5]], np.float32), "predicted_length": np.array([[42]], np.int32)})
    assert (p.max_tokens, p.ignore_eos, p.stream, p.temperature, p.predicted_length) == (7, True, True, 0.5, 42)


@pytest.mark.parametrize("arrays, field", [
    ({}, "text_input"),
    ({"text_input": text("   ")}, "text_input"),
    ({"text_input": text(b"\xff\xfe bad")}, "text_input"),
    ({"text_input": np.array([[b"a"], [b"b"]], dtype=np.object_)}, "text_input"),
    ({"text_input": text("hi"), "max_tokens": np.array([[1.5]], np.float32)}, "max_tokens"),
    ({"text_input": text("hi"), "temperature": np.array([[np.nan]], np.float32)}, "temperature"),
    ({"text_input": text("hi"), "temperature": np.array([[-1.0]], np.float32)}, "temperature"),
])
def test_bad_inputs_name_the_field(arrays, field):
    with pytest.raises(RequestError, match=f"^{field}:"):
        parse_llm_inputs(arrays)


def test_non_positive_prediction_means_unknown():
    p = parse_llm_inputs({"text_input": text("hi"), "predicted_length": np.array([[0]], np.int32)})
    assert p.predicted_length is None


def test_request_parameters_are_refused_by_name():
    from ssjf.serving import check_parameters

    check_parameters("{}")
    check_parameters(None)
    with pytest.raises(RequestError, match="^parameters: unknown request parameter\\(s\\) 'max_token', 'top_k'"):
        check_parameters('{"top_k": 5, "max_token": 3}')


def test_an_oversized_prompt_is_refused_before_decoding():
    big = np.array([[b"x" * 1001]], dtype=np.object_)
    with pytest.raises(RequestError, match="^text_input: 1001 bytes is over the limit of 1000"):
        parse_llm_inputs({"text_input": big}, max_prompt_bytes=1000)
    assert parse_llm_inputs({"text_input": big}).text == "x" * 1001  # 0: no limit
