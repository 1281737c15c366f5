"""Input conversion (serving.py) and the one admission path (Engine.submit), no Triton needed."""

import json

import numpy as np
import pytest

from conftest import ListSink
from ssjf.config import EngineConfig
from ssjf.engine import Engine, RequestError
from ssjf.metrics import Metrics
from ssjf.runners.torch.runner import ModelRunner
from ssjf.serving import parse_llm_inputs


class Counting(Metrics):
    def __init__(self):
        self.fallbacks = 0

    def proxy_fallback(self):
        self.fallbacks += 1


@pytest.fixture
def engine(tiny_model, tokenizer):
    config = EngineConfig(runner="torch", dtype="float32", max_seq_len=256, max_batch_size=2, max_prompt_bytes=1000)
    return Engine(config, runner=ModelRunner(config, model=tiny_model, tokenizer=tokenizer), metrics=Counting())


def admit(engine, arrays):
    """What llm/model.py does with a request's tensors."""
    return engine.submit(parse_llm_inputs(arrays), ListSink(), request_id="r")


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
def test_bad_inputs_name_the_field(engine, arrays, field):
    with pytest.raises(RequestError, match=f"^{field}:"):
        admit(engine, arrays)
    assert not engine._inbox  # nothing was queued


def test_non_positive_prediction_means_unknown_and_is_counted(engine):
    req = admit(engine, {"text_input": text("hi"), "predicted_length": np.array([[0]], np.int32)})
    assert req.predicted_length is None and engine.metrics.fallbacks == 1
    req = admit(engine, {"text_input": text("hi"), "predicted_length": np.array([[7]], np.int32)})
    assert req.predicted_length == 7 and engine.metrics.fallbacks == 1


def test_submit_applies_defaults_tokenizes_and_queues_once(engine):
    req = admit(engine, {"text_input": text("hello there")})
    assert req.prompt_ids == engine.encode_prompt("hello there")
    assert req.max_tokens == min(engine.config.default_max_tokens, 256 - req.prompt_len)
    assert req.deadline == req.arrival_time + engine.config.request_timeout_s
    assert list(engine._inbox) == [req]
    engine.run_until_idle()
    assert req.sink.finals == 1


def test_a_stopped_engine_refuses_new_requests(engine):
    engine.stop()
    with pytest.raises(RequestError, match="^server shutting down"):
        admit(engine, {"text_input": text("hi")})


def test_request_parameters_are_refused_by_name():
    from ssjf.serving import check_parameters

    check_parameters("{}")
    check_parameters(None)
    with pytest.raises(RequestError, match="^parameters: unknown request parameter\\(s\\) 'max_token', 'top_k'"):
        check_parameters('{"top_k": 5, "max_token": 3}')


def test_an_oversized_prompt_is_refused_before_tokenization(engine, monkeypatch):
    big = np.array([[b"x" * 1001]], dtype=np.object_)
    monkeypatch.setattr(engine, "encode_prompt", lambda text: pytest.fail("tokenized"))
    with pytest.raises(RequestError, match="^text_input: 1001 bytes is over the limit of 1000"):
        admit(engine, {"text_input": big})
    engine.config.max_prompt_bytes = 0  # no limit
    monkeypatch.undo()
    with pytest.raises(RequestError, match="^text_input: the prompt has .* tokens; the context holds 256"):
        admit(engine, {"text_input": big})  # past the byte limit, the context decides


def msgs(turns):
    return np.array([[json.dumps(turns).encode()]], dtype=np.object_)


def test_a_conversation_is_templated_whole_and_the_proxy_reads_its_last_user_turn(engine):
    turns = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a river."}]
    parsed = parse_llm_inputs({"messages": msgs(turns)})
    assert parsed.text == "Name a river." and parsed.messages == turns
    req = engine.submit(parsed, ListSink(), request_id="c")
    want = engine.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    assert req.prompt_ids == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert req.prompt_len > len(engine.encode_prompt("Name a river."))  # the history is in the prompt


@pytest.mark.parametrize("raw, field", [
    (b"not json", "messages"),
    (b"[]", "messages"),
    (b'{"role": "user", "content": "hi"}', "messages"),
    (b'[{"role": "user"}]', "messages\\[0\\]"),
    (b'[{"role": "robot", "content": "hi"}]', "messages\\[0\\].role"),
    (b'[{"role": "user", "content": 3}]', "messages\\[0\\].content"),
    (b'[{"role": "user", "content": "hi", "name": "x"}]', "messages\\[0\\]"),
    (b'[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]', "messages"),
    (b'[{"role": "user", "content": "   "}]', "messages"),
    (b"\xff\xfe", "messages"),
    (b"[" * 100_000 + b"]" * 100_000, "messages"),  # the recursive JSON parser never sees it
    (b'[{"role": "user", "content": "' + b"[" * 50 + b'"}, ' + b"[" * 9 + b"]" * 9 + b"]", "messages"),
    (b'[{"role": "user", "content": "x\\ud800y"}]', "messages\\[0\\].content"),  # a lone surrogate
    (b'[{"role": "user", "content": "' + b"a" * (2 << 20) + b'"}]', "messages"),
])
def test_bad_messages_name_the_field(engine, raw, field):
    with pytest.raises(RequestError, match=f"^{field}:"):
        admit(engine, {"messages": np.array([[raw]], dtype=np.object_)})
    assert not engine._inbox


def test_json_depth_skips_brackets_inside_strings():
    from ssjf.serving import json_depth

    assert json_depth('[{"role": "user", "content": "[[[[{{{{"}]') == 2
    assert json_depth('{"a": "\\"[[[", "b": [[1]]}') == 3
    assert json_depth("[" * 1000 + "]" * 1000) == 1000
    assert json_depth("") == 0


def test_text_input_or_messages_not_both(engine):
    with pytest.raises(RequestError, match="^messages: send text_input or messages, not both"):
        admit(engine, {"text_input": text("hi"), "messages": msgs([{"role": "user", "content": "hi"}])})


def test_priority_is_parsed_and_carried_to_the_request(engine):
    req = admit(engine, {"text_input": text("hi"), "priority": np.array([[2]], dtype=np.int32)})
    assert req.priority == 2
    assert admit(engine, {"text_input": text("hi")}).priority == 0
    with pytest.raises(RequestError, match="^priority: expected an integer"):
        admit(engine, {"text_input": text("hi"), "priority": np.array([[0.5]], dtype=np.float32)})


def test_the_input_table_matches_both_configs_the_ensemble_maps_and_the_client():
    """serving.INPUTS is the one statement of the llm's inputs: both config.pbtxt files, the
    ensemble's input maps and the client's tensors must agree with it."""
    import re
    from pathlib import Path

    from ssjf.config import ServerConfig
    from ssjf.serving import INPUTS, OUTPUTS
    from ssjf_client.client import build_inputs

    repo = Path(ServerConfig().model_repository)

    def declared(model):
        text = (repo / model / "config.pbtxt").read_text()
        block = text[text.index("input ["):text.index("output [")]
        return {m[0]: (m[1], int(m[2])) for m in re.findall(r'name: "(\w+)", data_type: TYPE_(\w+), dims: \[ (-?\d+) \]', block)}

    assert declared("llm") == {i.name: (i.triton_type, i.dims) for i in INPUTS}
    assert declared("ssjf") == {i.name: (i.triton_type, i.dims) for i in INPUTS if i.client}
    ensemble = (repo / "ssjf" / "config.pbtxt").read_text()
    llm_step = ensemble[ensemble.index('model_name: "llm"'):]
    assert set(re.findall(r'input_map \{ key: "(\w+)"', llm_step)) == {i.name for i in INPUTS}
    for model in ("llm", "ssjf"):  # the outputs: both models alike, every one mapped out of the llm step
        text = (repo / model / "config.pbtxt").read_text()
        block = text[text.index("output ["):text.index("]\n", text.index("output ["))]
        assert re.findall(r'name: "(\w+)", data_type: TYPE_(\w+)', block) == list(OUTPUTS)
    assert re.findall(r'output_map \{ key: "(\w+)"', llm_step) == [name for name, _ in OUTPUTS]
    sent = build_inputs("hi", max_tokens=4, ignore_eos=True, temperature=0.5, priority=1, top_p=0.9, top_k=5, seed=7,
                        stop=["\n", "END"], return_finish_reason=True, return_num_output_tokens=True)
    sent += [t for t in build_inputs(None, messages=[{"role": "user", "content": "hi"}]) if t.name() == "messages"]
    triton = {"STRING": "BYTES"}
    assert {t.name(): t.datatype() for t in sent} == {i.name: triton.get(i.triton_type, i.triton_type)
                                                     for i in INPUTS if i.client}


def test_top_p_top_k_and_seed_convert_into_the_sampling_object():
    p = parse_llm_inputs({"text_input": np.array([[b"hi"]], dtype=object), "temperature": np.array([[0.7]], np.float32),
                          "top_p": np.array([[0.9]], np.float32), "top_k": np.array([[40]], np.int32),
                          "seed": np.array([[12345678901]], np.int64)})
    assert (p.sampling.temperature, p.sampling.top_k, p.sampling.seed) == (pytest.approx(0.7), 40, 12345678901)
    assert p.sampling.top_p == pytest.approx(0.9)
    with pytest.raises(RequestError, match="^top_k: expected an integer"):
        parse_llm_inputs({"text_input": np.array([[b"hi"]], dtype=object), "top_k": np.array([[1.5]], np.float32)})


def test_stop_strings_convert_and_are_checked_in_one_place(engine):
    stops = np.array([[b"END", "\u00bb".encode()]], dtype=np.object_)
    assert parse_llm_inputs({"text_input": text("hi"), "stop": stops}).stop == ["END", "\u00bb"]
    assert admit(engine, {"text_input": text("hi"), "stop": stops}).stop == ("END", "\u00bb")
    with pytest.raises(RequestError, match="^stop: at most 4"):
        admit(engine, {"text_input": text("hi"), "stop": np.array([[b"a", b"b", b"c", b"d", b"e"]], dtype=np.object_)})
    with pytest.raises(RequestError, match="^stop: each string must have 1 to"):
        admit(engine, {"text_input": text("hi"), "stop": np.array([[b""]], dtype=np.object_)})
    with pytest.raises(RequestError, match="^stop: not valid UTF-8"):
        parse_llm_inputs({"text_input": text("hi"), "stop": np.array([[b"\xff"]], dtype=np.object_)})
