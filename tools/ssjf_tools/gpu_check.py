"""`ssjf gpu-check`: the first run on a GPU, in one command (scripts/gpu-check.sh runs it there).

1. correctness: the engine on the torch runner on CUDA, requests joining mid-flight, against
   transformers' greedy `generate` on the same weights (a small random Llama, fp32: exact), with
   the decode step replayed from CUDA graphs and without;
2. speed: bench-engine on CUDA in bf16 at batch 1, 8 and 16 (graphs on, and off) on a SmolLM2-shaped model with random
   weights (with EOS ignored the weights' values do not change the work), against transformers'
   static `generate`, and vLLM bare where it is installed;
3. the proxy on CUDA: p50 latency of one prompt (a MiniLM-shaped random encoder) and its dtype.

A GPU host may have no registry and no model packages: `--pack DIR` (run here) writes what the
check needs besides the code, SmolLM2's config and tokenizer (a few MB, no weights), into DIR,
which travels with the working tree. The served smoke test needs a tritonserver and is left to
`docker compose up` on the GPU host (README, GPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ssjf.config import EngineConfig
from ssjf.cpus import machine
from ssjf.engine import Engine
from ssjf.runners.torch.runner import ModelRunner
from ssjf.request import NullSink, Request

from .bench_engine import PROMPTS, bench_engine, bench_hf_generate
from .report import emit

FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")


def pack(out: Path) -> None:
    from ssjf.assets import minilm_path, smollm2_path

    for src, name in ((smollm2_path(), "smollm2"), (minilm_path(), "minilm")):
        (out / name).mkdir(parents=True, exist_ok=True)
        for f in FILES + ("vocab.txt",):
            if (src / f).exists():
                shutil.copy2(src / f, out / name / f)
    print(f"packed {sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 2**20:.1f} MiB into {out}")


def check_correctness(tokenizer, device: str, cuda_graphs: bool = True) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval().to(device)
    config = EngineConfig(runner="torch", device=device, dtype="float32", max_seq_len=256, max_batch_size=4,
                          cuda_graphs=cuda_graphs)
    engine = Engine(config, runner=ModelRunner(config, model=model, tokenizer=tokenizer))
    reqs = [Request(str(i), engine.encode_prompt(p), max_tokens=12 + 3 * i, sink=NullSink(), ignore_eos=True)
            for i, p in enumerate(PROMPTS[:6])]
    engine.add_request(reqs[0])
    engine.step()
    for r in reqs[1:]:  # join mid-flight, more than the 4 slots
        engine.add_request(r)
        engine.step()
    engine.run_until_idle()
    mismatched = []
    for r in reqs:
        ids = torch.tensor([r.prompt_ids], device=device)
        with torch.inference_mode():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        if ref != r.output_ids:
            mismatched.append(r.request_id)
    return {"requests": len(reqs), "mismatched": mismatched, "ok": not mismatched,
            "graphs": sorted(engine.runner._graphs)}


def random_model_folder(src: Path, dst: Path, dtype) -> Path:
    """SmolLM2's architecture and tokenizer with random weights, saved where EngineConfig(model=...) loads it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (dst / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).to(dtype)
        model.save_pretrained(dst)
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def check_speed(folder: Path, device: str, dtype: str, batches: list[int], new_tokens: int,
                cuda_graphs: bool = True) -> dict:
    out = {}
    for batch in batches:
        config = EngineConfig(model=str(folder), runner="torch", device=device, dtype=dtype, max_batch_size=batch,
                              max_seq_len=1024, cuda_graphs=cuda_graphs)
        engine = Engine(config)
        prompts = [engine.encode_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
        bench_engine(engine, prompts, 8)  # warm-up
        ours = max(bench_engine(engine, prompts, new_tokens) for _ in range(2))
        hf = max(bench_hf_generate(engine.runner.model, engine.tokenizer, prompts, new_tokens) for _ in range(2))
        out[f"batch_{batch}"] = {"ssjf_engine": round(ours, 1), "hf_generate_static": round(hf, 1),
                                 "engine_vs_generate": round(ours / hf, 2)}
        print(f"batch {batch:3d}, graphs {cuda_graphs}: engine {ours:8.1f} tokens/s, generate {hf:8.1f} ({ours / hf:.2f}x)", flush=True)
        del engine
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def check_proxy(src: Path, device: str) -> dict:
    from transformers import AutoConfig, AutoModel

    from ssjf.cpus import resolve_dtype
    from ssjf.proxy.encoder import FastBert

    model = AutoModel.from_config(AutoConfig.from_pretrained(src)).eval().to(device, resolve_dtype("auto", device))
    fast = FastBert(model) if FastBert.supports(model) else model
    ids = torch.randint(0, 1000, (1, 64), device=device)
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        for i in range(60):
            t = time.perf_counter()
            fast(ids, mask) if isinstance(fast, FastBert) else fast(input_ids=ids, attention_mask=mask)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 10:
                times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"p50_ms_64_tokens": round(times[len(times) // 2], 2), "dtype": str(next(model.parameters()).dtype)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ssjf gpu-check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, help="write the config and tokenizer files the check needs here, and stop")
    ap.add_argument("--from", dest="src", type=Path, default=Path(".gpu-pack"), help="a folder --pack wrote")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ssjf-gpu-check"), help="where the random model is saved")
    ap.add_argument("--out", help="write the report (JSON) here")
    args = ap.parse_args(argv)
    if args.pack:
        pack(args.pack)
        return {}
    from transformers import AutoTokenizer

    report = {"machine": machine(), "device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    tokenizer = AutoTokenizer.from_pretrained(args.src / "smollm2")
    graphs = (True, False) if args.device.startswith("cuda") else (False,)
    report["correctness"] = {f"graphs_{g}": check_correctness(tokenizer, args.device, g) for g in graphs}
    print("correctness:", json.dumps(report["correctness"]), flush=True)
    folder = random_model_folder(args.src / "smollm2", args.work / "smollm2-random", getattr(torch, args.dtype))
    report["speed"] = {f"graphs_{g}": check_speed(folder, args.device, args.dtype,
                                                  [int(b) for b in args.batches.split(",")], args.new_tokens, g)
                       for g in graphs}
    report["proxy"] = check_proxy(args.src / "minilm", args.device)
    print("proxy:", json.dumps(report["proxy"]), flush=True)
    return emit(report, args.out)


if __name__ == "__main__":
    main()
