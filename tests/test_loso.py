"""Leave-one-source-out evaluation (`ssjf loso`) on small sources the test writes: a rule every
source shares transfers to the one left out; a source's verbosity does not get in its way."""

import json

import numpy as np
import pytest

from ssjf_tools.loso import main as loso_main, standardise


def source(path, verbosity, seed):
    rng = np.random.default_rng(seed)
    topics = ["the sea", "a city", "trains", "music", "winter", "a garden", "the moon", "bread", "rivers", "chess"]
    lines = []
    for i in range(60):
        essay = i % 2 == 0
        prompt = (f"Write a long detailed essay about {topics[i % 10]}, part {i}." if essay
                  else f"Answer in one word: what colour is {topics[i % 10]}? ({i})")
        n = int(verbosity * (rng.integers(150, 250) if essay else rng.integers(2, 8)))
        lines.append(json.dumps({"prompt": prompt, "response": "word " * n, "id": f"{seed}-{i}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_standardise_within_each_group_from_training_rows_only():
    y = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    group = np.array([0, 0, 0, 1, 1, 1])
    z = standardise(y, group, np.array([True, True, True, True, True, False]))
    assert z[:3] == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3)
    assert z[3:5] == pytest.approx([-1.0, 1.0], abs=1e-3) and z[5] == pytest.approx(3.0, abs=1e-3)


def test_a_shared_rule_transfers_to_the_left_out_source(tmp_path):
    specs = [f"s{k}={source(tmp_path / f's{k}.jsonl', verbosity, k)}" for k, verbosity in enumerate((1.0, 3.0, 0.5))]
    out = tmp_path / "loso.json"
    report = loso_main([arg for s in specs for arg in ("--source", s)] + [
        "--objectives", "ranking", "--targets", "log,source-z", "--out", str(out)])
    for key in ("ranking, log", "ranking, source-z"):
        row = report["rows"][key]
        assert set(row) >= {"s0", "s1", "s2", "mean", "min", "in-distribution"}
        assert row["min"] > 0.3, (key, row)  # essays are long in every source, whatever its verbosity (0.5: perfect)
    assert json.loads(out.read_text())["sources"] == ["s0", "s1", "s2"]
