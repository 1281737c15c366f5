"""Loaders for each supported format, on small files the tests write."""

import json

import pytest

from ssjf_tools.data import load_rows, parse_data_spec


def write(path, records, array=False):
    with open(path, "w", encoding="utf-8") as f:
        if array:
            json.dump(records, f)
        else:
            f.write("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_project_rows(tmp_path):
    path = write(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "hi", "response": "hello", "model": "m1"},
                                           {"prompt": "count", "length": 12}])
    rows = list(load_rows(path))
    assert [(r.prompt, r.response, r.length, r.model) for r in rows] == [("hi", "hello", None, "m1"),
                                                                         ("count", None, 12, "")]
    assert [r.prompt for r in load_rows(path, {"m1"})] == ["hi"]


@pytest.mark.parametrize("array", [False, True])
def test_sharegpt_pairs_human_and_gpt_turns(tmp_path, array):
    conv = {"id": "c1", "conversations": [
        {"from": "human", "value": "first question"}, {"from": "gpt", "value": "first answer"},
        {"from": "human", "value": "second"}, {"from": "gpt", "value": "second answer"},
        {"from": "human", "value": "dangling, no answer"}]}
    rows = list(load_rows(write(tmp_path / "sg.json", [conv], array=array)))
    assert [(r.prompt, r.response) for r in rows] == [("first question", "first answer"), ("second", "second answer")]
    assert rows[0].model == "chatgpt" and rows[1].id == "c1#1"


def test_lmsys_pairs_user_and_assistant_turns(tmp_path):
    rec = {"conversation_id": "x", "model": "vicuna-13b", "conversation": [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]}
    rows = list(load_rows(write(tmp_path / "lmsys.jsonl", [rec])))
    assert [(r.prompt, r.response, r.model) for r in rows] == [("What is 2+2?", "4", "vicuna-13b"),
                                                               ("And 3+3?", "6", "vicuna-13b")]


def test_alpaca_joins_instruction_and_input(tmp_path):
    recs = [{"instruction": "Sort these.", "input": "3, 1, 2", "output": "1, 2, 3"},
            {"instruction": "Write a haiku.", "input": "", "response": "five seven five"}]  # GPTeacher says response
    rows = list(load_rows(write(tmp_path / "alpaca.json", recs, array=True)))
    assert [(r.prompt, r.response) for r in rows] == [("Sort these.\n\n3, 1, 2", "1, 2, 3"),
                                                      ("Write a haiku.", "five seven five")]


def test_anthropic_hh_transcripts_gzipped(tmp_path):
    import gzip

    rec = {"chosen": "\n\nHuman: hi there\n\nAssistant: Hello!\n\nHuman: tell me a joke\n\nAssistant: Why did...",
           "rejected": "\n\nHuman: hi there\n\nAssistant: Hello!\n\nHuman: tell me a joke\n\nAssistant: No."}
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    rows = list(load_rows(path))
    assert [(r.prompt, r.response, r.id) for r in rows] == [("hi there", "Hello!", "1#0"),
                                                            ("tell me a joke", "Why did...", "1#1")]


def test_unknown_record_and_bad_json_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no 'prompt'"):
        list(load_rows(write(tmp_path / "bad.jsonl", [{"text": "x"}])))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        list(load_rows(tmp_path / "broken.jsonl"))


def test_data_spec_with_model_filter():
    assert parse_data_spec("a/b.jsonl") == ("a/b.jsonl", None)
    assert parse_data_spec("a/b.jsonl@m1,m2") == ("a/b.jsonl", {"m1", "m2"})


def test_response_lengths_prefer_the_recorded_length(tokenizer):
    from ssjf_tools.data import Row, count_tokens, response_lengths

    rows = [Row("p", response="Hello there, world!"), Row("q", length=7), Row("r", response="")]
    assert response_lengths(rows) == [len(tokenizer.encode("Hello there, world!", add_special_tokens=False)), 7, 1]
    assert count_tokens([]) == []


def test_arrival_times_from_an_azure_trace(tmp_path):
    from ssjf_tools.data import load_arrival_times

    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:47.1000000,10,5\n2023-11-16 18:15:46.6805900,10,5\n")
    stamps = load_arrival_times(str(trace))
    assert stamps == sorted(stamps) and abs((stamps[1] - stamps[0]) - 0.41941) < 1e-3
