"""The OpenAI API's request mapping and error shapes, without a server."""

import json

import pytest

from ssjf.openai_api import APIError, from_triton, parse_body


def test_chat_maps_to_messages_and_the_token_limits():
    f = parse_body({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                    "max_completion_tokens": 5, "temperature": 0.5, "priority": 1, "stream": True,
                    "stream_options": {"include_usage": True}, "seed": 3}, chat=True)
    assert json.loads(f["messages"]) == [{"role": "user", "content": "hi"}]
    assert (f["max_tokens"], f["temperature"], f["priority"], f["_stream"], f["_usage_in_stream"]) == (5, 0.5, 1, True, True)
    assert parse_body({"prompt": ["once"], "max_tokens": 2}, chat=False)["text_input"] == "once"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),  # True == 1, still refused
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "priority": 0.5}, "priority"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": "s"}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 2.5}, "top_k"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": "0.9"}, "top_p"),
])
def test_bad_fields_are_named(body, param):
    with pytest.raises(APIError) as exc:
        parse_body(body, chat=True)
    assert exc.value.status == 400 and exc.value.param == param


def test_server_errors_become_openai_errors():
    e = from_triton("in ensemble 'ssjf', max_tokens: must be >= 1, got 0")
    assert (e.status, e.param) == (400, "max_tokens") and e.message.startswith("max_tokens:")
    assert from_triton("in ensemble 'ssjf', queue full: 9 requests are waiting (max_waiting=8)").status == 503
    assert from_triton("messages[0].content: not valid Unicode").param == "messages"


def test_stop_strings_go_to_the_engine_as_one_input():
    from ssjf.openai_api import triton_inputs

    sent = {t.name(): t for t in triton_inputs(parse_body({"prompt": "hi", "stop": ["END", "\n\n"]}, chat=False))}
    assert (sent["stop"].datatype(), sent["stop"].shape()) == ("BYTES", [1, 2])
    assert parse_body({"prompt": "hi", "stop": "END"}, chat=False)["stop"] == ["END"]
    assert "stop" not in {t.name() for t in triton_inputs(parse_body({"prompt": "hi"}, chat=False))}
    with pytest.raises(APIError, match="at most 4"):
        parse_body({"prompt": "hi", "stop": list("abcde")}, chat=False)


def test_sampling_fields_reach_the_ensembles_inputs():
    from ssjf.openai_api import triton_inputs

    f = parse_body({"prompt": "hi", "temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 3}, chat=False)
    sent = {t.name(): t.datatype() for t in triton_inputs(f)}
    assert {k: sent[k] for k in ("temperature", "top_p", "top_k", "seed")} == \
        {"temperature": "FP32", "top_p": "FP32", "top_k": "INT32", "seed": "INT64"}
