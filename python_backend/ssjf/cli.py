"""The `ssjf` console script: one table of commands, each a module with main(argv)."""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    "serve": ("ssjf.cli:serve", "run tritonserver in the foreground (ports from HTTP_PORT/GRPC_PORT/METRICS_PORT)"),
    "prepare": ("ssjf.cli:prepare_main", "prepare the default models once (SmolLM2 GGUF -> HF folder, Triton backends)"),
    "generate": ("ssjf_client.cli:main", "send one prompt over gRPC and stream the answer"),
    "bench": ("ssjf_client.bench:main", "SSJF vs FCFS vs oracle SJF on the same arrivals, a fresh server per policy"),
    "versus": ("ssjf_client.versus:main", "this project against `vllm serve` (FCFS and priority), same arrivals, fresh servers"),
    "simulate": ("ssjf_client.simulate:main", "the bench's replay through the engine's scheduler, on a virtual clock"),
    "bench-engine": ("ssjf.bench_engine:main", "engine tokens/s against transformers' generate and generate_batch"),
    "bench-overhead": ("ssjf_client.overhead:main", "Triton round trip minus the engine's own time, concurrency 1"),
    "soak": ("ssjf_client.soak:main", "Locust for minutes at a multiple of measured capacity; memory and hangs"),
    "profile": ("ssjf.profile:main", "record the served LLM's own output lengths over a prompt set (resumable)"),
    "train-proxy": ("ssjf.train_proxy:main", "train a length-predictor artifact from prompt/response rows"),
    "eval-proxy": ("ssjf.eval_proxy:main", "Kendall tau, Spearman, MAE, bucket accuracy and latency of an artifact"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print("usage: ssjf COMMAND [args]  (ssjf COMMAND --help for its options)\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:{width}}  {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    module, _, function = COMMANDS[argv[0]][0].partition(":")
    result = getattr(importlib.import_module(module), function)(argv[1:])
    return result if isinstance(result, int) else 0


def prepare() -> None:
    import importlib.util

    from .assets import minilm_path, smollm2_path

    print(f"llm: {smollm2_path()}\nencoder: {minilm_path()}", flush=True)
    if importlib.util.find_spec("pytriton") is not None:  # absent in the official Triton container
        from .server import backend_dir

        print(f"triton backends: {backend_dir()}", flush=True)


def prepare_main(argv) -> int:
    if argv:
        raise SystemExit("ssjf prepare takes no arguments")
    prepare()
    return 0


def serve(argv) -> None:
    from .server import ServerConfig
    from .server import serve as run

    if argv:
        raise SystemExit("ssjf serve takes no arguments; configure it with environment variables (see README)")
    prepare()
    run(ServerConfig.from_env())


if __name__ == "__main__":
    sys.exit(main())
