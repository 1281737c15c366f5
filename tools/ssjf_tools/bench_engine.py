"""Engine throughput, side by side in one run: this engine's continuous batching on the torch
runner, transformers' static batched `generate`, transformers' continuous batching
(`generate_batch`), and where vLLM is installed this engine on the vllm runner against vLLM's
own engine stepped bare (no queue of ours: what our queue costs). N requests, each generating
exactly T new tokens (EOS ignored).
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from ssjf.config import EngineConfig
from ssjf.cpus import machine
from ssjf.engine import Engine
from ssjf.request import NullSink, Request
from .flags import config_args
from .report import emit

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a hash map works.",
    "What are the benefits of exercise?",
    "Describe the water cycle.",
    "Give me a recipe for pancakes.",
    "Summarize the plot of Hamlet.",
    "How do airplanes fly?",
    "Write a poem about autumn leaves.",
]


def bench_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    reqs = [Request(f"b{i}", p, max_tokens=new_tokens, sink=NullSink(), ignore_eos=True) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    for r in reqs:
        engine.add_request(r)
    engine.run_until_idle()
    elapsed = time.perf_counter() - start
    assert all(len(r.output_ids) == new_tokens for r in reqs)
    return len(reqs) * new_tokens / elapsed


def bench_decode_step(runner, prompts: list[list[int]], steps: int = 20, ahead: int = 50) -> float:
    """The torch runner's decode step alone, in ms (median of `steps`): the prompts prefilled into
    slots 0..N-1, every row `ahead` tokens past its prompt (the cache rows there hold the prompt's
    neighbours' values; the timing does not depend on them)."""
    import statistics

    runner.threads.bind("bench")
    runner.prefill(list(range(len(prompts))), prompts)
    tokens, positions = [1] * len(prompts), [len(p) + ahead for p in prompts]
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        runner.decode(tokens, positions)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_vllm_bare(llm, prompts: list[list[int]], new_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        llm.add_request(f"bare{time.monotonic_ns()}-{i}", {"prompt_token_ids": p}, params)
    total = 0
    while llm.has_unfinished_requests():
        total += sum(len(o.outputs[0].token_ids) for o in llm.step() if o.finished)
    elapsed = time.perf_counter() - start
    assert total == len(prompts) * new_tokens, total
    return total / elapsed


def bench_hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> float:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == new_tokens
    return len(prompts) * new_tokens / elapsed


def bench_hf_generate_batch(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> float:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                           pad_token_id=tokenizer.pad_token_id or 0)
    start = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=cfg, progress_bar=False)
    elapsed = time.perf_counter() - start
    total = sum(len(o.generated_tokens) for o in outs.values())
    if total != len(prompts) * new_tokens:
        raise RuntimeError(f"generate_batch produced {total} tokens, expected {len(prompts) * new_tokens}")
    return total / elapsed


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ssjf bench-engine", description=__doc__)
    config_args(ap, ["model", "device", "dtype", "num_threads", "decode_kernels"])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is reported")
    ap.add_argument("--skip", default="", help="comma list of baselines to skip: generate,generate_batch,vllm")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, runner="torch",
                          max_batch_size=args.concurrency, max_seq_len=1024, num_threads=args.num_threads,
                          decode_kernels=args.decode_kernels)
    engine = Engine(config)
    model, tok = engine.runner.model, engine.tokenizer
    prompts = [engine.encode_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(args.concurrency)]
    runs = {"ssjf_engine": lambda: bench_engine(engine, prompts, args.new_tokens),
            "hf_generate_static": lambda: bench_hf_generate(model, tok, prompts, args.new_tokens),
            "hf_generate_batch": lambda: bench_hf_generate_batch(model, tok, prompts, args.new_tokens)}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if "vllm" not in skip and importlib.util.find_spec("vllm") is not None:
        vconfig = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, runner="vllm",
                               max_batch_size=args.concurrency, max_seq_len=1024, num_threads=args.num_threads,
                          decode_kernels=args.decode_kernels)
        vengine = Engine(vconfig)
        runs["ssjf_engine_vllm"] = lambda: bench_engine(vengine, prompts, args.new_tokens)
        runs["vllm_bare"] = lambda: bench_vllm_bare(vengine.runner.engine, prompts, args.new_tokens)
    runs = {name: fn for name, fn in runs.items() if name.replace("hf_", "").replace("_static", "") not in skip}
    # rounds interleave the engines (A B C, A B C): a machine that speeds up or slows down while the
    # benchmark runs shifts every engine's best alike instead of favouring whichever ran last
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            best[name] = max(best.get(name, 0.0), fn())
    results = {name: round(v, 1) for name, v in best.items()}
    for name, v in results.items():
        print(f"{name:22s} {v:8.1f} tokens/s", flush=True)
    report = {"config": {"model": args.model, "device": args.device, "dtype": str(engine.runner.dtype),
                         "concurrency": args.concurrency, "new_tokens": args.new_tokens,
                         "machine": machine()}, "tokens_per_s": results}
    if "ssjf_engine" in results:  # where the torch runner's time goes: one decode step alone
        report["torch_decode_step_ms"] = round(bench_decode_step(engine.runner, prompts), 2)
        print(f"torch runner decode step {report['torch_decode_step_ms']:.2f} ms", flush=True)
    if "hf_generate_static" in results:
        report["engine_vs_generate"] = round(results["ssjf_engine"] / results["hf_generate_static"], 2)
    if "hf_generate_batch" in results:
        report["engine_vs_generate_batch"] = round(results["ssjf_engine"] / results["hf_generate_batch"], 2)
    if "vllm_bare" in results:
        report["vllm_runner_vs_vllm_bare"] = round(results["ssjf_engine_vllm"] / results["vllm_bare"], 3)
        report["torch_runner_vs_vllm_bare"] = round(results["ssjf_engine"] / results["vllm_bare"], 2)
    return emit(report, args.out)


if __name__ == "__main__":
    main()
