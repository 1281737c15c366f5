"""`ssjf bench --url` replays a small trace against the session's server: every request completes."""

import json

from ssjf_client.bench import main as bench


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
