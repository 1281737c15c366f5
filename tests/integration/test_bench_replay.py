"""`ssjf bench --url` replays a small trace against the session's server: every request completes."""

import json
import re

from ssjf_tools.bench import main as bench


def test_trace_replay_against_a_running_server(server, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Question {i}: name a color.", "response": "word " * (3 + 4 * i)})
                              for i in range(6)))
    out = tmp_path / "report.json"
    report = bench(["--data", str(rows), "--url", server.grpc_url, "--policies", "ssjf", "--num-requests", "6",
                    "--rate", "20", "--length-scale", "1.0", "--out", str(out)])
    m = report["policies"]["ssjf"]
    assert (m["completed"], m["failed"]) == (6, 0)
    assert 0 < m["mean_ttft_s"] <= m["mean_jct_s"]
    saved = json.loads(out.read_text())
    assert set(saved) >= {"config", "policies", "runs"} and out.with_suffix(".md").exists()


def test_natural_replay_stops_at_eos_or_the_cap(server, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Tell me a story about the number {i}.", "response": "x"})
                              for i in range(4)))
    out = tmp_path / "natural.json"
    report = bench(["--data", str(rows), "--url", server.grpc_url, "--policies", "ssjf", "--num-requests", "4",
                    "--rate", "20", "--natural", "--natural-max-tokens", "6", "--out", str(out)])
    m = report["policies"]["ssjf"]
    assert (m["completed"], m["failed"]) == (4, 0)
    # streamed chunks, not the rows' (rounded: tokens/s x seconds comes back as 6.000000000000001)
    tokens_per_request = round(m["throughput_tok_s"] * m["duration_s"] / m["completed"], 6)
    assert 1 <= tokens_per_request <= 6  # a story runs long: the cap sent with each request ended it


def test_repeated_rounds_interleave_the_policies(server, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Say {i}.", "response": "word " * (2 + 3 * i)}) for i in range(4)))
    out = tmp_path / "rounds.json"
    report = bench(["--data", str(rows), "--url", server.grpc_url, "--policies", "fcfs,ssjf", "--num-requests", "4",
                    "--rate", "20", "--repeats", "2", "--out", str(out)])
    run = report["runs"][0]
    assert len(run["rounds"]) == 2 and all(set(r) == {"fcfs", "ssjf"} for r in run["rounds"])
    m = run["policies"]["ssjf"]
    assert (m["completed"], m["failed"], m["rounds"]) == (8, 0, 2)
    assert len(m["mean_jct_s_vs_fcfs"]["rounds"]) == 2 and len(m["duration_s_vs_fcfs"]["rounds"]) == 2
    assert run["orders"] == [["fcfs", "ssjf"], ["ssjf", "fcfs"]]  # each round starts with the next policy...
    assert list(run["rounds"][1]) == ["fcfs", "ssjf"]  # ...and the report keeps one order
    assert re.search(r"\| \d+\.\d+x \(rounds \d+\.\d+-\d+\.\d+x\) \|", out.with_suffix(".md").read_text())


def test_load_sweep_reports_capacity_under_the_slo_and_plots(server, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Count to {i}.", "response": "word " * (2 + 2 * i)}) for i in range(4)))
    out, plots = tmp_path / "sweep.json", tmp_path / "plots"
    report = bench(["--data", str(rows), "--url", server.grpc_url, "--policies", "fcfs,ssjf", "--num-requests", "4",
                    "--rates", "10,20", "--slo-norm-latency", "1000", "--plots", str(plots), "--out", str(out)])
    assert [r["rate"] for r in report["runs"]] == [10.0, 20.0]
    capacity = report["slo"]["capacity"]["continuous"]
    assert capacity["ssjf"] == {"max_rate_rps": 20.0, "interpolated_rate_rps": 20.0, "bounded": False}  # a loose SLO
    assert report["plots"] == [str(plots / "bench_continuous.png")] and (plots / "bench_continuous.png").stat().st_size
    assert "highest swept rate" in out.with_suffix(".md").read_text()
    assert json.loads(out.read_text())["slo"] == report["slo"]
