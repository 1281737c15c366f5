"""A short headless Locust run against the session's server: TTFT and JCT entries, no failures."""

import csv
import os
import subprocess
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"


def test_headless_locust_run(server, tmp_path):
    prefix = tmp_path / "run"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "3", "-r", "3", "-t", "12s",
           "--host", server.grpc_url, "--csv", str(prefix), "--only-summary", "--stop-timeout", "30"]
    env = {"SSJF_LOAD_MAX_TOKENS": "12", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["Name"]: r for r in csv.DictReader(open(f"{prefix}_stats.csv"))}
    for name in ("ttft", "jct"):
        assert int(rows[name]["Request Count"]) >= 3, rows
        assert int(rows[name]["Failure Count"]) == 0, rows
    assert float(rows["ttft"]["Median Response Time"]) <= float(rows["jct"]["Median Response Time"])
