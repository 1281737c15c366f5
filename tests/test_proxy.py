"""The proxy pipeline on a small synthetic set: split by conversation and prompt, train each objective,
save, load, evaluate; and `ssjf profile`, which records the served model's own lengths."""

import json
import random

import numpy as np
import pytest

from ssjf_tools.data import Row, conversation, load_rows
from ssjf_tools.eval_proxy import proxy_metrics
from ssjf_tools.split import held_out, in_test_split, split_key, split_meta
from ssjf.proxy import LengthPredictor
from ssjf_tools.train_proxy import main as train


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Prompts whose answer length follows the task: one-word answers vs long essays, two answering models."""
    rng = random.Random(0)
    topics = ["rivers", "cats", "the moon", "bread", "trains", "music", "chess", "volcanoes", "tea", "bees",
              "glass", "maps", "snow", "clocks", "salt", "ships", "paper", "wind", "gold", "ants"]
    rows = []
    for t in topics:
        for kind, n in (("Answer yes or no: is {} blue?", 2), ("Name one fact about {}.", 12),
                        ("Write a detailed essay about the history of {}.", 180)):
            prompt = kind.format(t)
            for model, scale in (("terse", 1), ("verbose", 2)):
                rows.append({"prompt": prompt, "response": " ".join(["word"] * (n * scale + rng.randrange(3))),
                             "model": model})
    path = tmp_path_factory.mktemp("proxy") / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_split_is_by_prompt():
    prompts = [f"p{i % 37}" for i in range(500)]
    sides = {}
    for p in prompts:
        sides.setdefault(p, set()).add(in_test_split(p, 0.3))
    assert all(len(s) == 1 for s in sides.values())
    assert 0.1 < np.mean([in_test_split(f"q{i}", 0.3) for i in range(2000)]) < 0.5


def test_split_keeps_a_conversation_together_and_a_prompt_on_one_side():
    rows = []
    for c in range(300):  # turns of one conversation share a topic; "continue" recurs in many
        rows += [Row(prompt=f"write section {k} of the report on topic {c}", id=f"conv{c}#{2 * k}") for k in range(3)]
        rows.append(Row(prompt="continue", id=f"conv{c}#7"))
    rows += [Row(prompt=f"standalone {i}", id=f"alpaca/{i}") for i in range(200)]  # no conversation
    rows.append(Row(prompt="write section 0 of the report on topic 0", id="alpaca/x"))  # also outside it
    meta = {"test_fraction": 0.3, "split_seed": 2, "split": split_meta(rows)}
    assert len(meta["split"]["shared_prompts"]) == 2  # "continue", and the prompt seen in and outside conv0
    sides = [held_out(r, meta) for r in rows]
    by_conv, by_prompt = {}, {}
    for r, side in zip(rows, sides):
        by_prompt.setdefault(r.prompt, set()).add(side)
        if r.prompt not in ("continue", "write section 0 of the report on topic 0") and "#" in r.id:
            by_conv.setdefault(conversation(r.id), set()).add(side)
    assert all(len(s) == 1 for s in by_prompt.values()) and all(len(s) == 1 for s in by_conv.values())
    assert 0.15 < np.mean([s.pop() for s in by_conv.values()]) < 0.45
    assert split_key(rows[0], set()) == "conversation:conv0" and split_key(rows[-2], set()) == "standalone 199"
    # an artifact without a recorded split (trained before conversation splits) splits by prompt
    old = {"test_fraction": 0.3, "split_seed": 2}
    assert [held_out(r, old) for r in rows] == [in_test_split(r.prompt, 0.3, 2) for r in rows]


def test_metrics():
    m = proxy_metrics(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40]), [15, 25, 35])
    assert m["kendall_tau"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    assert m["bucket_accuracy"] == 0.25 and m["mae_tokens"] == pytest.approx(22.5)  # only 1 -> bucket 0 matches 10
    assert proxy_metrics(np.array([5, 5, 5]), np.array([1, 2, 3]), [2])["kendall_tau"] == 0.0


def test_prompt_ceiling_groups_answers_by_prompt():
    from ssjf_tools.eval_proxy import prompt_ceiling

    assert prompt_ceiling(["a", "b", "c"], np.array([1, 2, 3])) is None  # no prompt recurs
    # two prompts, two answers each: the prompt's mean orders the 4 cross-prompt pairs and ties the 2
    # within a prompt (tau-b 0.816); the other answer gets those 2 backwards: (4 - 2) / 6
    c = prompt_ceiling(["a", "a", "b", "b"], np.array([10, 12, 100, 120]))
    assert c["prompts"] == 2 and c["rows"] == 4
    assert c["prompt_mean_kendall_tau"] == pytest.approx(4 / (4 * 6) ** 0.5)
    assert c["leave_one_out_kendall_tau"] == pytest.approx(1 / 3)
    # the leave-one-out mean is the other answer's own length, here backwards within each prompt
    c = prompt_ceiling(["a", "a", "b"], np.array([10, 20, 15]), rows=[0, 1])
    assert c["rows"] == 2 and c["leave_one_out_kendall_tau"] == pytest.approx(-1.0)


@pytest.mark.parametrize("objective", ["regression", "classification", "ranking"])
def test_train_save_load_predict(synthetic, tmp_path, objective):
    out = tmp_path / f"{objective}.npz"
    results = train(["--data", str(synthetic), "--name", str(out), "--objective", objective, "--encoder-layers", "1",
                     "--condition-on-model", "--target-model", "verbose", "--test-fraction", "0.3", "--epochs", "80"])
    assert results[objective]["kendall_tau"] > 0.5, results
    p = LengthPredictor(str(out))
    assert p.meta["objective"] == objective and p.meta["encoder"]["layers"] == 1
    short, long = p.predict(["Answer yes or no: is jazz blue?", "Write a detailed essay about the history of jazz."])
    assert 1 <= short < long
    terse, verbose = p.predict(["Write a detailed essay about the history of jazz."] * 2, models=["terse", "verbose"])
    assert terse < verbose  # conditioning on the answering model


@pytest.mark.parametrize("objective", ["classification", "ranking"])
def test_source_z_target_learns_within_each_source_and_predicts_lengths(synthetic, tmp_path, objective):
    # the same prompts answered by a terse and a verbose model, given as two sources
    out = tmp_path / "z.npz"
    results = train(["--data", f"{synthetic}@terse", "--data", f"{synthetic}@verbose", "--name", str(out),
                     "--objective", objective, "--target", "source-z", "--encoder-layers", "1",
                     "--test-fraction", "0.3", "--epochs", "80"])
    assert results[objective]["kendall_tau"] > 0.5, results
    p = LengthPredictor(str(out))
    assert p.meta["target"] == "source-z"
    short, long = p.predict(["Answer yes or no: is jazz blue?", "Write a detailed essay about the history of jazz."])
    assert 1 <= short < 20 and 60 < long < 800  # mapped back to token counts, between the two models' scales


def test_shipped_artifacts_load_and_carry_metadata():
    for name in ("recorded", "smollm2", "recorded-l16", "smollm2-l16", "general"):
        p = LengthPredictor(name)
        for key in ("objective", "encoder", "tokenizer", "target_model", "bucket_edges", "test_metrics", "data"):
            assert key in p.meta, (name, key)
        assert p.predict(["Write a long story about a dragon."])[0] >= 1


def test_finetune_ships_adapters_that_serve_like_training(synthetic, tmp_path):
    """Fine-tuning trains low-rank adapters end to end (here from a deliberately weak one-step head,
    so there is something to gain); the artifact carries them (small) and the serving encoder,
    with them merged into its weights, embeds exactly as the adapted one did."""
    import torch

    from ssjf.proxy.encoder import ADAPTER, Encoder
    from ssjf_tools.train_proxy import adapter_arrays, add_adapters

    out = tmp_path / "ft.npz"
    results = train(["--data", str(synthetic), "--name", str(out), "--objective", "regression", "--encoder-layers",
                     "1", "--condition-on-model", "--target-model", "verbose", "--test-fraction", "0.3",
                     "--epochs", "1", "--hidden", "0", "--finetune-rank", "4", "--finetune-epochs", "4"])
    assert results["regression+finetune"]["kendall_tau"] > 0.5, results
    p = LengthPredictor(str(out))
    assert p.meta["objective"] == "regression+finetune" and p.meta["finetune"]["rank"] == 4
    with np.load(out) as d:
        adapters = {k: d[k] for k in d.files if k.startswith(ADAPTER)}
    assert any(k.endswith(".a") for k in adapters) and any(k.endswith(".weight") for k in adapters)
    assert sum(v.nbytes for v in adapters.values()) < 200_000
    short, long = p.predict(["Answer yes or no: is jazz blue?", "Write a detailed essay about the history of jazz."])
    assert 1 <= short < long

    texts = ["Name one fact about jazz.", "Write a detailed essay about the history of jazz, please."]
    adapted = Encoder("minilm", layers=1)
    add_adapters(adapted, 4)
    torch.manual_seed(1)
    for name, prm in adapted.model.named_parameters():
        if prm.requires_grad:
            prm.data.add_(torch.randn_like(prm) * 0.05)  # adapters and norms away from identity
    with torch.no_grad():
        want = adapted.forward(texts)[0]
    merged = Encoder("minilm", layers=1)
    merged.load_adapters({k: v.astype(np.float32) for k, v in adapter_arrays(adapted).items()})
    got = merged.forward(texts)[0]
    assert not torch.allclose(want, Encoder("minilm", layers=1).forward(texts)[0], atol=1e-3)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2), ("int8", 3e-2)])
def test_fast_bert_matches_transformers(dtype, tol):
    """The lean inference path embeds as transformers' BertModel does, padding and all."""
    import torch

    from ssjf.proxy.encoder import Encoder

    enc = Encoder("minilm", layers=3, dtype=dtype)
    texts = ["hi", "Write a detailed essay about the history of jazz, with dates and names.", "Name one fact."]
    with torch.no_grad():
        fast = enc.forward(texts)[0]
        assert enc._fast is not None
        enc.lean = False
        slow = enc.forward(texts)[0]
        single = [enc.forward([t])[0][0] for t in texts]  # no padding
    torch.testing.assert_close(fast, slow, atol=tol, rtol=0)
    torch.testing.assert_close(torch.stack(single), slow, atol=tol, rtol=0)
    enc.lean, enc.max_length = True, 32
    assert enc.warm_up() > 0  # every width up to max_length, through the lean path
    with torch.no_grad():
        torch.testing.assert_close(enc.forward(texts)[0], fast, atol=tol, rtol=0)


def test_the_encoder_dtype_follows_the_hardware_whatever_the_artifact_was_trained_in(monkeypatch):
    import ssjf.cpus
    from ssjf.proxy.encoder import encoder_dtype

    minilm = {"name": "minilm", "dtype": "bfloat16"}
    monkeypatch.setattr(ssjf.cpus, "native_bf16", lambda: True)
    assert encoder_dtype("auto", "cpu", minilm) == "bfloat16"
    monkeypatch.setattr(ssjf.cpus, "native_bf16", lambda: False)  # an AVX2-only CPU: bf16 would be emulated
    assert encoder_dtype("auto", "cpu", minilm) == "int8"
    assert encoder_dtype("auto", "cpu", {"name": "smollm2", "dtype": "bfloat16"}) == "float32"  # not BERT-family
    assert encoder_dtype("float32", "cpu", minilm) == "float32"  # an explicit setting wins


def test_finetune_that_does_not_beat_the_frozen_encoder_is_not_shipped(synthetic, tmp_path):
    out = tmp_path / "kept.npz"
    results = train(["--data", str(synthetic), "--name", str(out), "--objective", "regression", "--encoder-layers",
                     "1", "--test-fraction", "0.3", "--epochs", "80", "--finetune-rank", "4", "--finetune-epochs", "1"])
    p = LengthPredictor(str(out))
    if results.get("finetune", {}).get("kept") is False:
        assert p.meta["objective"] == "regression" and p.meta["finetune"] is None
        with np.load(out) as d:
            assert not [k for k in d.files if k.startswith("adapter.")]
    else:  # it did beat it: then it ships, and says so
        assert p.meta["objective"] == "regression+finetune"
        assert results["regression+finetune"]["val_kendall_tau"] > results["regression"]["val_kendall_tau"]


def test_last_token_pooling_on_the_served_llm():
    """pooling="last" embeds a prompt by the served LLM's state where its answer would start: the
    last token after the chat template, the same whether the prompt is batched with longer ones
    (right padding) or alone, and kept when a long prompt is cut."""
    import torch

    from ssjf.proxy.encoder import Encoder

    enc = Encoder("smollm2", layers=2, pooling="last", max_length=40)
    texts = ["hi", "Write a detailed essay about the history of jazz, with dates and names, please."]
    with torch.no_grad():
        batched, lens = enc.forward(texts)
        alone = torch.cat([enc.forward([t])[0] for t in texts])
    torch.testing.assert_close(batched, alone, atol=2e-4, rtol=0)
    own = [len(x) for x in enc.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert lens.tolist() == own

    long_text = "jazz " * 200
    ids, counts = enc._token_ids([long_text])
    full = enc.tokenizer.apply_chat_template([{"role": "user", "content": long_text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert len(ids[0]) == 40 and ids[0][-16:] == full[-16:] and ids[0][:24] == full[:24]
    assert counts[0] == len(enc.tokenizer(long_text, add_special_tokens=False)["input_ids"])


def test_held_out_follows_the_split_an_artifact_records():
    from ssjf.proxy import read_meta

    rows = [Row(prompt=f"q{i}", id=f"c{i // 4}#{i % 4}") for i in range(400)]
    meta = {"test_fraction": 0.3, "split_seed": 5, "split": split_meta(rows)}
    assert [held_out(r, meta) for r in rows] == [in_test_split(f"conversation:c{i // 4}", 0.3, 5) for i in range(400)]
    for name in ("recorded", "recorded-l16"):  # what `ssjf bench --split test` holds out for each
        m = read_meta(name)
        assert (m["test_fraction"], m["split_seed"], m["split"]["by"]) == (0.2, 0, "conversation")


def test_profile_records_the_served_models_lengths_and_resumes(tmp_path):
    from ssjf_tools.profile import main as profile

    src = tmp_path / "sharegpt.json"
    def turns(*texts):
        return [{"from": who, "value": t} for who, t in zip(["human", "gpt"] * len(texts), texts)]

    convs = [{"id": "c1", "conversations": turns("Say hi.", "Hi!", "Count to ten.", "1 2 3")},
             {"id": "c2", "conversations": turns("Say hi.", "Hello.")}]
    src.write_text(json.dumps(convs))
    out = tmp_path / "profile.jsonl"
    assert profile(["--data", str(src), "--out", str(out), "--max-tokens", "5", "--limit", "1", "--batch", "2"]) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["prompt"] for r in first} == {"Say hi."}  # --limit: stopped after one prompt; a rerun resumes
    profile(["--data", str(src), "--out", str(out), "--max-tokens", "5", "--batch", "2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # each distinct prompt ran once, and is written once per conversation it occurs in, under its source turn
    assert sorted((r["id"], r["prompt"]) for r in rows) == [("c1#0", "Say hi."), ("c1#1", "Count to ten."),
                                                            ("c2#0", "Say hi.")]
    say = [r for r in rows if r["prompt"] == "Say hi."]
    assert say[0]["response"] == say[1]["response"] and say[0]["length"] == say[1]["length"]
    for r in rows:
        assert 1 <= r["length"] <= 5 and r["finish_reason"] in ("stop", "length") and r["response"]
        assert r["model"].lower().startswith("smollm2")
    # train-proxy splits the profile as it would the source: "Say hi." (two conversations) by its text
    back, source = list(load_rows(out)), list(load_rows(src))
    assert split_meta(back) == split_meta(source) and len(split_meta(back)["shared_prompts"]) == 1
    for seed in range(4):
        meta = {"test_fraction": 0.5, "split_seed": seed, "split": split_meta(back)}
        assert sorted((r.id, held_out(r, meta)) for r in back) == sorted((r.id, held_out(r, meta)) for r in source)
