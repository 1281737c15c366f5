"""`ssjf bench-overhead`: what Triton adds to a request at concurrency 1.

For each request, sent one at a time, three times are taken for the *same* request:
  - client:   round trip over gRPC streaming, send -> final response (what a user sees);
  - engine:   the llm model's own time, execute() -> final send, tokenization included
              (the server's `ssjf_jct_seconds` histogram, read before and after);
  - proxy:    length_predictor's compute time (Triton's statistics: compute_input +
              compute_infer + compute_output) for the ensemble.
Overhead = client - engine - proxy: gRPC, the ensemble scheduler, the proxy's dynamic
batcher queue, and the Python backend's IPC. Pairing per request removes the run-to-run
noise of CPU generation from the difference.

`--throughput`: the serving tax at a full batch instead. The same requests (B at a time, each T
new tokens, EOS ignored) through the bare engine in this process, then through the served
ensemble, all queued at once in both; the report gives both tokens/s and bare / served.
"""

from __future__ import annotations

import argparse
import os
import statistics

import tritonclient.grpc as grpcclient

from ssjf_client.client import SSJFClient, metric_total, scrape_metrics
from .flags import config_args
from .report import emit

PROMPT = "What is the capital of France?"


def scrape_jct(metrics_url: str) -> tuple[float, float]:
    """The server's JCT histogram: (sum of seconds, count) over its labels."""
    values = scrape_metrics(metrics_url, "ssjf_jct_seconds_")
    return metric_total(values, "ssjf_jct_seconds_sum"), metric_total(values, "ssjf_jct_seconds_count")


def proxy_compute(stats_client) -> tuple[float, int]:
    stats = stats_client.get_inference_statistics("length_predictor", as_json=True)["model_stats"][0]
    inf = stats["inference_stats"]
    ns = sum(int(inf[k].get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output"))
    return ns / 1e9, int(inf["success"].get("count", 0))


def quantiles_ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    pick = lambda f: round(xs[int(f * (len(xs) - 1))] * 1000, 2)  # noqa: E731
    return {"p25": pick(0.25), "p50": round(statistics.median(xs) * 1000, 2), "p75": pick(0.75),
            "mean": round(statistics.fmean(xs) * 1000, 2)}


def measure(client: SSJFClient, stats_client, metrics_url: str, n: int, max_tokens: int, ensemble: bool) -> dict:
    rows = {"client": [], "engine": [], "proxy": [], "overhead": []}
    for i in range(n + 3):
        s0, c0 = scrape_jct(metrics_url)
        p0, pc0 = proxy_compute(stats_client)
        r = client.generate(PROMPT, max_tokens=max_tokens, ignore_eos=True)
        s1, c1 = scrape_jct(metrics_url)
        p1, pc1 = proxy_compute(stats_client)
        if not r.ok or c1 - c0 != 1:
            raise RuntimeError(f"request {i}: {r.error or 'metrics did not count exactly one request'}")
        engine = s1 - s0
        proxy = (p1 - p0) if ensemble else 0.0
        if ensemble and pc1 - pc0 != 1:
            raise RuntimeError("length_predictor did not count exactly one request")
        if i >= 3:  # warm-up
            for k, v in zip(rows, (r.jct_s, engine, proxy, r.jct_s - engine - proxy)):
                rows[k].append(v)
    return {k: quantiles_ms(v) for k, v in rows.items()}


def served_tokens_per_s(grpc_url: str, prompts: list[str], new_tokens: int) -> float:
    """Every prompt sent at once through the ensemble (bench's replay, one gRPC stream), as the bare
    run queues them all at once; tokens/s from the first send to the last final response."""
    from .bench import Job, replay

    jobs = [Job(i, p, new_tokens, 0.0) for i, p in enumerate(prompts)]
    replay(grpc_url, jobs, True, timeout=900)
    failed = [j.error for j in jobs if j.error or j.done is None]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
    return len(prompts) * new_tokens / max(j.done for j in jobs)


def throughput(args) -> dict:
    from ssjf.config import EngineConfig
    from ssjf.cpus import machine
    from ssjf.engine import Engine
    from ssjf.server import ServerConfig, TritonServer

    from .bench_engine import PROMPTS, bench_engine

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch * args.rounds)]
    config = EngineConfig(runner=args.runner, dtype=args.dtype, max_batch_size=args.batch)
    engine = Engine(config)
    ids = [engine.encode_prompt(p) for p in prompts]
    bench_engine(engine, ids[: args.batch], 8)  # warm-up
    bare = max(bench_engine(engine, ids, args.new_tokens) for _ in range(2))
    runner, dtype = engine.config.runner, str(getattr(engine.runner, "dtype", args.dtype))
    del engine
    env = dict(os.environ, SSJF_RUNNER=runner, SSJF_DTYPE=args.dtype, SSJF_MAX_BATCH_SIZE=str(args.batch),
               SSJF_POLICY="fcfs")
    with TritonServer(ServerConfig.on_free_ports(), env=env) as server:
        served_tokens_per_s(server.grpc_url, prompts[: args.batch], 8)  # warm-up
        served = max(served_tokens_per_s(server.grpc_url, prompts, args.new_tokens) for _ in range(2))
    return {"config": {"runner": runner, "dtype": dtype, "batch": args.batch, "requests": len(prompts),
                       "new_tokens": args.new_tokens, "machine": machine()},
            "bare_tokens_per_s": round(bare, 1), "served_tokens_per_s": round(served, 1),
            "bare_over_served": round(bare / served, 3)}


def main(argv=None) -> dict:
    from ssjf.server import ServerConfig, TritonServer

    ap = argparse.ArgumentParser(prog="ssjf bench-overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--http-port", type=int, default=18600, help="ports used: this, +1 (gRPC), +2 (metrics)")
    ap.add_argument("--throughput", action="store_true", help="the serving tax at a full batch (see above)")
    ap.add_argument("--batch", type=int, default=16, help="--throughput: requests in flight")
    ap.add_argument("--rounds", type=int, default=3, help="--throughput: requests = batch x rounds")
    ap.add_argument("--new-tokens", type=int, default=128, help="--throughput: tokens per request")
    config_args(ap, ["runner", "dtype"])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.throughput:
        return emit(throughput(args), args.out)

    cfg = ServerConfig(http_port=args.http_port, grpc_port=args.http_port + 1, metrics_port=args.http_port + 2)
    metrics_url = f"http://{cfg.host}:{cfg.metrics_port}"
    with TritonServer(cfg) as server:
        stats_client = grpcclient.InferenceServerClient(server.grpc_url)
        with SSJFClient(server.grpc_url) as ens, SSJFClient(server.grpc_url, model="llm") as llm:
            report = {
                "config": {"requests": args.requests, "max_tokens": args.max_tokens, "prompt": PROMPT,
                           "method": "per request: client round trip - llm server time - proxy compute"},
                "ensemble_ms": measure(ens, stats_client, metrics_url, args.requests, args.max_tokens, True),
                "llm_direct_ms": measure(llm, stats_client, metrics_url, args.requests, args.max_tokens, False),
            }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
