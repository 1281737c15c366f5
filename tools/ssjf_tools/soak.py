"""`ssjf soak`: Locust against a fresh server for minutes at a multiple of its measured capacity,
with the resident memory of tritonserver and its Python stubs sampled throughout.

  1. calibrate: closed-loop saturation (users send back to back) for --calibrate-s; the
     completed requests per second is the capacity for this workload.
  2. soak: --minutes at --load x capacity, Poisson-like arrivals over --users Locust users.
     The waiting queue is bounded (SSJF_MAX_WAITING), so overload is answered "queue full".
  3. verdict: every request completed or got an explicit error; none hung (no client timeout,
     nothing left queued or running in the server afterwards); memory growth after warm-up.

  ssjf soak --minutes 10 --load 1.5 --out results/soak.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ssjf_client.client import scrape_metrics

LOCUSTFILE = Path("loadtest") / "locustfile.py"  # from the checkout; --locustfile elsewhere


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (tritonserver and its stubs), in MB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def run_locust(grpc_url: str, users: int, seconds: float, rate: float, csv_prefix: Path, env: dict,
               locustfile: Path = LOCUSTFILE) -> dict:
    """One headless Locust run: its stats rows by name (latency percentiles) and the locustfile's ledger
    (counts; the CSV can miss requests that end during the stop phase)."""
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{int(seconds)}s", "--host", grpc_url, "--csv", str(csv_prefix), "--only-summary",
           "--stop-timeout", "600", "--exit-code-on-error", "0"]
    run_env = {**os.environ, **env, "SSJF_LOAD_RATE": str(rate),
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=seconds + 900)
    if proc.returncode != 0:
        raise RuntimeError(f"locust failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = {r["Name"]: r for r in csv.DictReader(open(f"{csv_prefix}_stats.csv"))}
    ledger = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("ssjf-ledger ")]
    if not ledger:
        raise RuntimeError(f"locust printed no ledger: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return {"rows": rows, "ledger": ledger[0]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ssjf soak", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--load", type=float, default=1.5, help="arrival rate as a multiple of the measured capacity")
    ap.add_argument("--calibrate-s", type=float, default=90.0)
    ap.add_argument("--capacity", type=float, default=0.0, help="req/s; skips calibration")
    ap.add_argument("--users", type=int, default=96)
    ap.add_argument("--max-waiting", type=int, default=48, help="the server's waiting-queue bound for the soak")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", default="../shared/data/sharegpt.jsonl",
                    help="JSON lines with prompt (and response); the built-in prompts when missing")
    ap.add_argument("--warmup-s", type=float, default=120.0)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--out", default="results/soak.json")
    ap.add_argument("--locustfile", type=Path, default=LOCUSTFILE, help="the load test (default: the checkout's)")
    args = ap.parse_args(argv)

    from ssjf.server import ServerConfig, TritonServer

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"SSJF_LOAD_MAX_TOKENS": str(args.max_tokens)}
    if Path(args.prompts).exists():
        env.update(SSJF_LOAD_PROMPTS=str(Path(args.prompts).resolve()), SSJF_LOAD_TRACE="1")
    server_env = dict(os.environ, SSJF_MAX_WAITING=str(args.max_waiting))
    config = ServerConfig.on_free_ports()
    report: dict = {"command": "ssjf soak " + " ".join(argv if argv is not None else sys.argv[1:]), "args": vars(args)}
    with TritonServer(config, env=server_env, log_path=out.with_suffix(".tritonserver.log")) as server:
        metrics_url = f"http://{config.host}:{config.metrics_port}"
        capacity = args.capacity
        if not capacity:
            cal = run_locust(server.grpc_url, 32, args.calibrate_s, 1000.0, out.with_suffix(".calibrate"), env, args.locustfile)
            done = cal["ledger"]["ok"]
            capacity = done / args.calibrate_s
            print(f"capacity: {capacity:.2f} req/s ({done} completed in {args.calibrate_s:.0f} s, saturated)", flush=True)
        rate = args.load * capacity
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample():
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - t0, tree_rss_mb(server.proc.pid)))
                stop.wait(args.sample_s)

        before = scrape_metrics(metrics_url)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        print(f"soak: {args.minutes:.0f} min at {rate:.2f} req/s ({args.load}x capacity), {args.users} users",
              flush=True)
        soak = run_locust(server.grpc_url, args.users, args.minutes * 60, rate, out.with_suffix(".soak"), env, args.locustfile)
        stop.set()
        sampler.join()
        time.sleep(2)
        after = scrape_metrics(metrics_url)
        ready = server.proc.poll() is None

    def delta(prefix: str) -> dict[str, float]:
        return {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix)}

    jct, ledger = soak["rows"]["jct"], soak["ledger"]
    errors = ledger["errors"]
    hung = sum(n for e, n in errors.items() if "no final response" in e)
    unanswered = ledger["sent"] - ledger["ok"] - sum(errors.values())
    warm = [rss for t, rss in samples if t >= args.warmup_s]
    base, last = (warm[0], max(warm[-max(1, len(warm) // 10):])) if warm else (0.0, 0.0)
    report.update({
        "capacity_rps": capacity, "rate_rps": rate,
        "sent": ledger["sent"], "ok": ledger["ok"], "errors": errors, "hung": hung, "unanswered": unanswered,
        "server_left_waiting": sum(v for k, v in after.items() if k.startswith("ssjf_queue_depth")),
        "server_left_running": sum(v for k, v in after.items() if k.startswith("ssjf_running_batch")),
        "server_requests": delta("ssjf_requests_total"), "server_rejections": delta("ssjf_rejections_total"),
        "server_tokens_per_s": sum(delta("ssjf_generated_tokens_total").values()) / (args.minutes * 60),
        "jct_p50_ms": float(jct["50%"]), "jct_p99_ms": float(jct["99%"]),
        "rss_mb_after_warmup": base, "rss_mb_end": last, "rss_mb_max": max(r for _, r in samples),
        "rss_growth_pct": 100.0 * (last - base) / base if base else None,
        "rss_samples": samples, "server_alive_at_end": ready,
    })
    report["verdict"] = {
        "zero_hung": hung == 0 and unanswered == 0 and report["server_left_waiting"] == 0
        and report["server_left_running"] == 0,
        "every_failure_explicit": all(e for e in errors),
        "memory_flat": report["rss_growth_pct"] is not None and report["rss_growth_pct"] < 5.0,
    }
    out.write_text(json.dumps(report, indent=2))
    summary = {k: v for k, v in report.items() if k not in ("rss_samples", "args")}
    print(json.dumps(summary, indent=2))
    return report


if __name__ == "__main__":
    main()
