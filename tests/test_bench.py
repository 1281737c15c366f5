"""Benchmark harness pieces: arrival processes and the metrics, on synthetic data."""

import json

import numpy as np
import pytest

from ssjf_tools.bench import Job, arrival_times, markdown, summarize


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_variability():
    p = arrival_times("poisson", 20000, rate=4.0, seed=1)
    gaps = np.diff(p)
    assert p[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    g = np.diff(arrival_times("gamma", 20000, rate=4.0, seed=1, cv=3.0))
    assert g.mean() == pytest.approx(0.25, rel=0.1) and g.std() / g.mean() == pytest.approx(3.0, rel=0.1)
    assert np.array_equal(arrival_times("poisson", 50, 2.0, seed=7), arrival_times("poisson", 50, 2.0, seed=7))


def test_azure_trace_is_time_scaled_to_the_rate(tmp_path):
    trace = tmp_path / "trace.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i, gap in enumerate([0.0, 1.0, 3.0, 0.5, 0.5, 5.0, 1.0]):
        lines.append(f"2023-11-16 18:15:{10 + int(sum([0.0, 1.0, 3.0, 0.5, 0.5, 5.0, 1.0][:i + 1])):02d}.0000000,10,10")
    trace.write_text("\n".join(lines) + "\n")
    t = arrival_times("azure", 5, rate=2.0, seed=0, trace=str(trace))
    assert len(t) == 5 and t[0] == 0
    assert np.diff(t).mean() == pytest.approx(0.5)  # mean gap 1 / rate, burstiness kept
    with pytest.raises(SystemExit):
        arrival_times("azure", 50, rate=2.0, seed=0, trace=str(trace))


def test_each_round_gets_new_arrivals_trace_windows_included(tmp_path):
    import argparse
    from ssjf_tools.bench import round_arrivals

    trace = tmp_path / "trace.csv"
    stamps = np.cumsum(np.random.default_rng(0).exponential(1.0, 40))
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:{int(t) // 60:02d}:{t % 60:010.7f},10,10\n" for t in stamps))
    args = argparse.Namespace(arrivals="azure", num_requests=10, seed=0, cv=2.0, azure_trace=str(trace), trace_offset=5)
    r0, r1 = round_arrivals(args, 2.0, 0), round_arrivals(args, 2.0, 1)
    assert np.allclose(r0, arrival_times("azure", 10, 2.0, 0, trace=str(trace), trace_offset=5))
    assert np.allclose(r1, arrival_times("azure", 10, 2.0, 0, trace=str(trace), trace_offset=15))  # the next window
    assert not np.allclose(r0, r1)
    args.arrivals = "poisson"
    assert not np.allclose(round_arrivals(args, 2.0, 0), round_arrivals(args, 2.0, 1))


def test_summary_metrics():
    jobs = [Job(0, "a", 4, arrival=0.0, first=0.5, done=1.0), Job(1, "b", 8, arrival=1.0, first=2.0, done=5.0),
            Job(2, "c", 2, arrival=2.0, first=2.5, done=3.0), Job(3, "d", 2, arrival=3.0, error="boom", done=3.1)]
    m = summarize(jobs, [4, 8, 2, 2])
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["mean_jct_s"] == pytest.approx((1 + 4 + 1) / 3)
    assert m["mean_ttft_s"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["mean_norm_latency_s_per_tok"] == pytest.approx((1 / 4 + 4 / 8 + 1 / 2) / 3)
    assert m["throughput_rps"] == pytest.approx(3 / 5) and m["throughput_tok_s"] == pytest.approx(14 / 5)
    assert m["busy_fraction"] == pytest.approx(1.0)  # someone was in the system from 0 to 5
    assert m["mean_in_system"] == pytest.approx((1 + 4 + 1) / 5)
    assert m["paper_throughput_25pct_rps"] == pytest.approx(1 / 1.0)  # 25% of 4 jobs = 1, done at t=1


def test_markdown_table_compares_to_fcfs():
    report = {"config": {"arrivals": "poisson", "num_requests": 2},
              "runs": [{"batching": "continuous", "rate": 1.0,
                        "policies": {"fcfs": {"mean_jct_s": 2.0, "completed": 2, "failed": 0},
                                     "ssjf": {"mean_jct_s": 1.0, "completed": 2, "failed": 0}}}]}
    md = markdown(report)
    assert "| ssjf |" in md and "0.50x" in md


def test_sjf_limit_is_shortest_first_against_every_arrival_order_with_all_jobs_queued():
    import itertools
    from ssjf_tools.bench import sjf_limit

    def mean_completion(order):
        return float(np.mean(np.cumsum(order)))

    lengths = [3, 50, 7, 120, 1]
    fcfs = np.mean([mean_completion(p) for p in itertools.permutations(lengths)])  # arrival order independent of length
    limit = sjf_limit(lengths)
    assert limit["full_queue_sjf_vs_fcfs"] == pytest.approx(mean_completion(sorted(lengths)) / fcfs)
    assert sjf_limit([40] * 10)["full_queue_sjf_vs_fcfs"] == pytest.approx(1.0)  # nothing to reorder
    exp = np.random.default_rng(0).exponential(100.0, 20000)
    assert sjf_limit(exp)["full_queue_sjf_vs_fcfs"] == pytest.approx(0.5, abs=0.02)
    md = markdown({"config": {"arrivals": "poisson", "num_requests": 5, "sjf_limit": limit}, "runs": []})
    assert f"{limit['full_queue_sjf_vs_fcfs']:.2f}x FCFS's mean" in md


def test_aiperf_input_is_the_same_replay(tmp_path):
    from ssjf_tools.bench import write_aiperf_input

    path = tmp_path / "in.jsonl"
    write_aiperf_input(str(path), [("hi", 7, 7), ("a longer one", None, 30)], [0.0, 1.2345])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"text": "hi", "timestamp": 0.0, "output_length": 7},
                    {"text": "a longer one", "timestamp": 1234.5}]


def test_aiperf_payload_template_renders_a_request_the_server_accepts():
    """docs/benchmarking.md's aiperf command posts this template to /generate_stream: it must be JSON, name
    only inputs the llm accepts (unknown fields are rejected), and ask for a token stream."""
    from pathlib import Path

    import jinja2

    from ssjf.serving import LLM_INPUTS

    template = Path(__file__).resolve().parents[1] / "loadtest" / "aiperf_payload.json.j2"
    rendered = jinja2.Environment().from_string(template.read_text()).render(
        text='say "hi"\nand go', max_tokens=7, stream=True)
    payload = json.loads(rendered)
    assert payload == {"text_input": 'say "hi"\nand go', "max_tokens": 7, "ignore_eos": True, "stream": True}
    assert set(payload) <= set(LLM_INPUTS)


def test_rounds_combine_into_means_and_per_round_ratios_to_fcfs():
    from ssjf_tools.bench import combine_rounds

    def m(mean, p99, completed=10, failed=0, duration=100.0):
        return {"mean_jct_s": mean, "p99_jct_s": p99, "completed": completed, "failed": failed,
                "paper_throughput_25pct_rps": None, "duration_s": duration}

    rounds = [{"fcfs": m(10.0, 20.0), "ssjf": m(8.0, 30.0)},  # a fast round...
              {"fcfs": m(20.0, 40.0), "ssjf": m(18.0, 40.0, 9, 1, duration=110.0)},  # ...and a slow one
              {"fcfs": m(12.0, 24.0), "ssjf": m(6.0, 24.0)}]
    out = combine_rounds(rounds)
    s = out["ssjf"]
    assert s["mean_jct_s"] == pytest.approx((8 + 18 + 6) / 3) and (s["completed"], s["failed"], s["rounds"]) == (29, 1, 3)
    vs = s["mean_jct_s_vs_fcfs"]
    assert vs["rounds"] == pytest.approx([0.8, 0.9, 0.5]) and vs["median"] == pytest.approx(0.8)
    assert (vs["min"], vs["max"]) == (pytest.approx(0.5), pytest.approx(0.9))
    assert s["p99_jct_s_vs_fcfs"]["median"] == pytest.approx(1.0)
    assert s["duration_s_vs_fcfs"]["rounds"] == pytest.approx([1.0, 1.1, 1.0])  # round 2 ran on a slower machine
    md = markdown({"config": {"arrivals": "poisson", "num_requests": 10},
                   "runs": [{"batching": "continuous", "rate": 1.0, "policies": out}]})
    assert "ssjf 1.00x, 1.10x, 1.00x" in md
    assert out["fcfs"]["mean_jct_s_vs_fcfs"]["median"] == 1.0
    assert "paper_throughput_25pct_rps" not in s  # a metric some round lacks is not averaged


def test_slo_capacity_is_the_highest_rate_before_the_first_miss():
    from ssjf_tools.bench import slo_capacity

    def run(rate, **p90):
        return {"batching": "continuous", "rate": rate,
                "policies": {k: {"p90_norm_latency_s_per_tok": v, "completed": 5} for k, v in p90.items()}}

    runs = [run(1.5, fcfs=3.0, ssjf=0.9, sjf_oracle=0.4), run(0.5, fcfs=0.2, ssjf=0.2, sjf_oracle=0.2),
            run(1.0, fcfs=0.8, ssjf=0.3, sjf_oracle=0.3), run(2.0, fcfs=0.4, ssjf=5.0, sjf_oracle=0.45)]
    cap = slo_capacity(runs, 0.5)["capacity"]["continuous"]
    # fcfs misses at 1.0 (0.2 -> 0.8 crosses 0.5 halfway); its lucky 0.4 at 2.0 does not count
    assert cap["fcfs"] == {"max_rate_rps": 0.5, "interpolated_rate_rps": pytest.approx(0.75), "bounded": True}
    assert cap["ssjf"]["max_rate_rps"] == 1.0 and cap["ssjf"]["interpolated_rate_rps"] == pytest.approx(1.0 + 0.2 / 0.6 * 0.5)
    assert cap["sjf_oracle"] == {"max_rate_rps": 2.0, "interpolated_rate_rps": 2.0, "bounded": False}
    assert slo_capacity(runs, 0.1)["capacity"]["continuous"]["fcfs"]["max_rate_rps"] is None  # misses at the lowest
    failed = [run(0.5, fcfs=0.2), {"batching": "continuous", "rate": 1.0, "policies": {"fcfs": {"completed": 0}}}]
    assert slo_capacity(failed, 0.5)["capacity"]["continuous"]["fcfs"]["max_rate_rps"] == 0.5  # a failed run misses

    md = markdown({"config": {"arrivals": "poisson", "num_requests": 5}, "runs": runs, "slo": slo_capacity(runs, 0.5)})
    assert "| continuous | ssjf | 1 | 1.17 | 1.56x |" in md and "| continuous | sjf_oracle | 2 (or more) | 2.00 | - |" in md
    loose = markdown({"config": {"arrivals": "poisson", "num_requests": 5}, "runs": runs, "slo": slo_capacity(runs, 3.5)})
    assert "| continuous | ssjf | 1.5 | 1.82 | - |" in loose  # FCFS meets a loose SLO everywhere: no ratio to a bound


def test_bench_engine_times_one_decode_step_of_the_torch_runner(tiny_model, tokenizer):
    from ssjf.config import EngineConfig
    from ssjf.runners.torch.runner import ModelRunner
    from ssjf_tools.bench_engine import bench_decode_step

    runner = ModelRunner(EngineConfig(dtype="float32", max_seq_len=128, max_batch_size=2), model=tiny_model,
                         tokenizer=tokenizer)
    ms = bench_decode_step(runner, [[1, 2, 3], [4, 5]], steps=3, ahead=10)
    assert 0 < ms < 10_000
