"""`ssjf versus --client openai`: our contender served by `ssjf serve` and called through its OpenAI
API with the very client `vllm serve` gets; every request completes, and the server is stopped after."""

import json

from ssjf_tools.versus import main as versus


def test_our_contender_through_the_openai_api(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Question {i}: name a color.", "response": "word " * (3 + 3 * i)})
                              for i in range(4)))
    out = tmp_path / "versus.json"
    report = versus(["--data", str(rows), "--num-requests", "4", "--length-scale", "1.0", "--max-batch-size", "4",
                     "--rates", "inf", "--contenders", "ssjf@torch", "--baseline", "ssjf@torch", "--client", "openai",
                     "--kv-cache-gib", "1", "--timeout", "300", "--out", str(out)])
    m = report["runs"][0]["contenders"]["ssjf@torch"]
    assert (m["completed"], m["failed"]) == (4, 0), m
    assert 0 < m["mean_ttft_s"] <= m["mean_jct_s"]
    log = (tmp_path / "versus.logs" / "ssjf-torch.log").read_text()
    assert "OpenAI API on" in log and "ssjf serve: stopped" in log
