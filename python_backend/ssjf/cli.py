"""The `ssjf` console script."""

from __future__ import annotations

import argparse
import logging
import sys

COMMANDS = {
    "serve": "run tritonserver in the foreground (ports from HTTP_PORT/GRPC_PORT/METRICS_PORT)",
    "prepare": "prepare the default models once (SmolLM2 GGUF -> HF folder, Triton backend folder)",
    "generate": "send one prompt over gRPC and stream the answer",
    "bench-engine": "engine tokens/s against transformers' generate and generate_batch",
    "bench": "SSJF vs FCFS vs oracle SJF on the same arrivals, a fresh server per policy",
    "bench-overhead": "Triton round trip minus in-process engine time at concurrency 1",
    "profile": "record the served LLM's own output lengths over a prompt set (resumable)",
    "train-proxy": "train a length-predictor artifact from prompt/response rows",
    "eval-proxy": "Kendall tau, Spearman, MAE, bucket accuracy and latency of a proxy artifact",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print("usage: ssjf COMMAND [args]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:{width}}  {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from .server import ServerConfig, serve

        argparse.ArgumentParser(prog="ssjf serve", description=COMMANDS["serve"]).parse_args(rest)
        prepare()
        serve(ServerConfig.from_env())
    elif command == "prepare":
        argparse.ArgumentParser(prog="ssjf prepare", description=COMMANDS["prepare"]).parse_args(rest)
        prepare()
    elif command == "generate":
        from ssjf_client.cli import main as generate

        return generate(rest)
    elif command == "bench-engine":
        from .bench_engine import main as bench

        bench(rest)
    elif command == "bench":
        from ssjf_client.bench import main as bench

        bench(rest)
    elif command == "bench-overhead":
        from ssjf_client.overhead import main as overhead

        overhead(rest)
    elif command == "profile":
        from .profile import main as profile

        return profile(rest)
    elif command == "train-proxy":
        from .train_proxy import main as train

        train(rest)
    elif command == "eval-proxy":
        from .eval_proxy import main as evaluate

        evaluate(rest)
    return 0


def prepare() -> None:
    import importlib.util

    from .assets import minilm_path, smollm2_path

    print(f"llm: {smollm2_path()}\nencoder: {minilm_path()}", flush=True)
    if importlib.util.find_spec("pytriton") is not None:  # absent in the official Triton container
        from .server import backend_dir

        print(f"triton backends: {backend_dir()}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
