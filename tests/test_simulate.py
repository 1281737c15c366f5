"""`ssjf simulate`: the engine's scheduler on a virtual clock, its cost model and calibration."""

import json

import numpy as np
import pytest

from ssjf.config import EngineConfig
from ssjf_tools.simulate import StepCost, calibrate, main, simulate

# one second per decode step and half a second per prefill, whatever the batch: times are countable
UNIT = StepCost(decode_s=1.0, decode_seq_s=0.0, prefill_s=0.5, prefill_token_s=0.0)


def done_times(policy, lengths, times, batching="none", **guard):
    config = EngineConfig(policy=policy, batching=batching, max_batch_size=1,
                          **{"starvation_s": 0.0, "max_passes": 0, "max_bypass_ratio": 0.0, **guard})
    jobs = simulate(config, [10] * len(lengths), lengths, lengths, np.array(times), UNIT)
    assert all(j.first is not None and j.first <= j.done for j in jobs)
    return [j.done for j in jobs]


def test_a_step_prefills_what_it_admits_then_decodes_every_running_request():
    # job 0 (3 tokens) runs alone: prefill token at 0.5, decode tokens at 1.5 and 2.5. Then FCFS takes
    # job 1 (2 tokens: 3.0 and 4.0), then job 2 (1 token, from its prefill at 4.5, no decode step)
    assert done_times("fcfs", [3, 2, 1], [0.0, 0.1, 0.2]) == pytest.approx([2.5, 4.0, 4.5])
    # oracle SJF takes the 1-token job 2 before job 1
    assert done_times("sjf_oracle", [3, 2, 1], [0.0, 0.1, 0.2]) == pytest.approx([2.5, 4.5, 3.0])
    # an idle engine waits for the next arrival
    assert done_times("fcfs", [1, 1], [0.0, 10.0]) == pytest.approx([0.5, 10.5])


def test_the_engines_own_starvation_guard_runs_in_the_simulation():
    # job 0 holds the engine; then jobs 2 and 3 (1 token) are shorter than job 1 (3 tokens)
    lengths, times = [2, 3, 1, 1], [0.0, 0.1, 0.2, 0.3]
    free = done_times("sjf_oracle", lengths, times)
    assert free[2] < free[3] < free[1]  # shortest first: job 1 last
    guarded = done_times("sjf_oracle", lengths, times, max_passes=1)
    assert guarded[2] < guarded[1] < guarded[3]  # passed over once, job 1 goes next


def test_oracle_sjf_beats_fcfs_when_continuous_batches_queue():
    rng = np.random.default_rng(0)
    n = 200
    lengths = [int(x) for x in np.clip(rng.lognormal(4.0, 1.0, n), 1, 1000)]
    times = np.cumsum(rng.exponential(0.3, n))
    cost = StepCost()  # the CPU defaults: 8 slots at ~0.05 s per step serve fewer such jobs than the ~3/s arriving

    def mean_jct(policy):
        config = EngineConfig(policy=policy, batching="continuous", max_batch_size=8, max_passes=0,
                              max_bypass_ratio=0.0, starvation_s=0.0)
        jobs = simulate(config, [64] * n, lengths, lengths, times, cost)
        assert all(j.done is not None for j in jobs)
        return np.mean([j.done - j.arrival for j in jobs])

    assert mean_jct("sjf_oracle") < 0.8 * mean_jct("fcfs")


def test_calibration_finds_the_cost_factor_for_a_measured_fcfs_mean():
    assert calibrate(6.0, lambda f: 3.0 * f) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(SystemExit):
        calibrate(1e9, lambda f: 3.0 * f)


def test_simulate_command_sweeps_guards_into_the_bench_report(tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "rows.jsonl"
    with data.open("w") as f:
        for i in range(40):
            words = int(rng.integers(5, 200))
            f.write(json.dumps({"id": f"c{i}#0", "prompt": f"Question {i}: tell me about topic {i % 7}.",
                                "response": " ".join(["word"] * words)}) + "\n")
    out = tmp_path / "sim.json"
    report = main(["--data", str(data), "--num-requests", "30", "--rate", "3", "--repeats", "2",
                   "--max-passes", "0,16", "--calibrate-fcfs-mean", "5", "--out", str(out)])
    run = report["runs"][0]
    assert set(run["policies"]) == {"fcfs", "ssjf K0 R2 S60", "ssjf K16 R2 S60",
                                    "sjf_oracle K0 R2 S60", "sjf_oracle K16 R2 S60"}
    assert all(m["completed"] == 60 and m["failed"] == 0 for m in run["policies"].values())
    assert run["policies"]["fcfs"]["mean_jct_s"] == pytest.approx(5.0, rel=0.02)  # calibrated
    assert "p99_jct_s_vs_fcfs" in run["policies"]["ssjf K16 R2 S60"]
    assert -1.0 <= report["config"]["prediction_kendall_tau"] <= 1.0
    assert 0.5 < report["config"]["sjf_limit"]["full_queue_sjf_vs_fcfs"] < 1.0  # lengths 5-200 words
    md = out.with_suffix(".md").read_text()
    assert "p99 JCT vs FCFS" in md and "Run length" not in md  # a virtual clock has no drift to report
    # exact predictions: Kendall tau 1, and oracle and SSJF then schedule alike
    exact = main(["--data", str(data), "--num-requests", "30", "--rate", "3", "--repeats", "2",
                  "--noise-sigma", "0", "--out", str(tmp_path / "exact.json")])
    assert exact["config"]["prediction_kendall_tau"] == pytest.approx(1.0)
    assert exact["policies"]["ssjf"]["mean_jct_s"] == pytest.approx(exact["policies"]["sjf_oracle"]["mean_jct_s"])


def test_from_bench_takes_a_real_reports_workload_guard_and_fcfs_mean(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "rows.jsonl"
    with data.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"id": f"c{i}#0", "prompt": f"Question {i} about topic {i % 5}.",
                                "response": " ".join(["word"] * int(rng.integers(5, 150)))}) + "\n")
    bench_report = {"config": {"data": str(data), "policies": "fcfs,ssjf", "num_requests": 25, "rate": 4.0, "rates": None,
                               "batching": "continuous", "arrivals": "poisson", "cv": 2.0, "azure_trace": None,
                               "trace_offset": 0, "length_scale": 0.5, "natural": False, "natural_max_tokens": None,
                               "artifact": "recorded", "max_batch_size": 4, "max_seq_len": 2048,
                               "max_prompt_tokens": 768, "split": "all", "seed": 3, "starvation_s": 60.0,
                               "max_bypass_ratio": 2.0, "max_passes": 8, "repeats": 3, "timeout": 900.0},
                    "runs": [{"batching": "continuous", "rate": 4.0,
                              "policies": {"fcfs": {"mean_jct_s": 6.5}, "ssjf": {"mean_jct_s": 5.0}}}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench_report))
    report = main(["--from-bench", str(path), "--repeats", "2", "--out", str(tmp_path / "sim.json")])
    config = report["config"]
    assert (config["num_requests"], config["max_batch_size"], config["seed"], config["max_passes"]) == (25, 4, 3, "8")
    assert set(report["policies"]) == {"fcfs", "ssjf"}
    assert report["policies"]["fcfs"]["mean_jct_s"] == pytest.approx(6.5, rel=0.02)  # calibrated on the real FCFS
    # a flag given on the command line wins over the report's
    swept = main(["--from-bench", str(path), "--repeats", "1", "--max-passes", "0,16", "--out", str(tmp_path / "s2.json")])
    assert set(swept["policies"]) == {"fcfs", "ssjf K0 R2 S60", "ssjf K16 R2 S60"}
