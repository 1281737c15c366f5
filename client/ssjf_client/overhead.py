"""`ssjf bench-overhead`: what Triton adds to a request at concurrency 1.

Interleaves, one request at a time: the `ssjf` ensemble over gRPC, the `llm` model
over gRPC (no proxy step), and the same engine and proxy in this process. Overhead =
p50 round trip through Triton - p50 in-process time. The in-process engine runs on
its own thread exactly as in the server; its time is add_request -> final send.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

import tritonclient.grpc as grpcclient

from .client import SSJFClient, build_inputs

PROMPT = "What is the capital of France?"


class _TimedSink:
    def __init__(self):
        self.done = threading.Event()

    def send(self, text, final):
        if final:
            self.done.set()

    def error(self, message):
        raise RuntimeError(message)

    def is_cancelled(self):
        return False


def p50_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 2)


def main(argv=None) -> dict:
    from ssjf.config import EngineConfig
    from ssjf.engine import Engine
    from ssjf.proxy import LengthPredictor
    from ssjf.request import Request
    from ssjf.server import ServerConfig, TritonServer

    ap = argparse.ArgumentParser(prog="ssjf bench-overhead", description=__doc__)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--http-port", type=int, default=18600)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    cfg = ServerConfig(http_port=args.http_port, grpc_port=args.http_port + 1, metrics_port=args.http_port + 2)
    with TritonServer(cfg) as server, SSJFClient(server.grpc_url) as ens, \
            SSJFClient(server.grpc_url, model="llm") as llm:
        engine = Engine(EngineConfig())
        engine.start()
        proxy = LengthPredictor()
        engine_threads = torch.get_num_threads()
        times = {"triton_ensemble": [], "triton_llm": [], "inproc_engine": [], "inproc_proxy": [],
                 "triton_proxy": []}
        proxy_client = grpcclient.InferenceServerClient(server.grpc_url)
        proxy_input = build_inputs(PROMPT)[:1]
        for i in range(args.requests + 3):
            r1 = ens.generate(PROMPT, max_tokens=args.max_tokens, ignore_eos=True)
            r2 = llm.generate(PROMPT, max_tokens=args.max_tokens, ignore_eos=True)
            assert r1.ok and r2.ok, (r1.error, r2.error)
            sink = _TimedSink()
            torch.set_num_threads(engine_threads)
            t = time.perf_counter()  # the same work the llm model does: tokenize, enqueue, generate
            engine.add_request(Request(f"o{i}", engine.encode_prompt(PROMPT), max_tokens=args.max_tokens,
                                       sink=sink, ignore_eos=True))
            sink.done.wait(60)
            engine_s = time.perf_counter() - t
            torch.set_num_threads(1)  # as length_predictor's num_threads in the server
            t = time.perf_counter()
            proxy.predict([PROMPT])
            proxy_s = time.perf_counter() - t
            t = time.perf_counter()
            proxy_client.infer("length_predictor", proxy_input)
            triton_proxy_s = time.perf_counter() - t
            if i >= 3:  # warm-up
                for k, v in zip(times, (r1.jct_s, r2.jct_s, engine_s, proxy_s, triton_proxy_s)):
                    times[k].append(v)
        engine.stop()
    p50 = {k: p50_ms(v) for k, v in times.items()}
    paired = sorted(e - g - p for e, g, p in zip(times["triton_ensemble"], times["inproc_engine"], times["inproc_proxy"]))
    q = lambda f: round(paired[int(f * (len(paired) - 1))] * 1000, 2)  # noqa: E731
    report = {
        "config": {"requests": args.requests, "max_tokens": args.max_tokens, "prompt": PROMPT},
        "p50_ms": p50,
        "overhead_p50_ms": {
            "llm_direct": round(p50["triton_llm"] - p50["inproc_engine"], 2),
            "length_predictor_direct": round(p50["triton_proxy"] - p50["inproc_proxy"], 2),
            "ensemble_without_proxy_compute": round(p50["triton_ensemble"] - p50["inproc_engine"] - p50["inproc_proxy"], 2),
            "ensemble_with_proxy_compute": round(p50["triton_ensemble"] - p50["inproc_engine"], 2),
        },
        "ensemble_overhead_paired_ms": {"p25": q(0.25), "p50": q(0.5), "p75": q(0.75)},
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
