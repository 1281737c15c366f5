"""`ssjf profile`: run the served LLM over a prompt set and record its own output lengths.

Natural mode: generation stops at EOS, with a cap (--max-tokens). Greedy by default, as
the server's default temperature. Output is JSON lines (`id`, `prompt`, `response`,
`length`, `finish_reason`, `model`), appended as requests finish; a rerun skips prompts
already in the file, so an interrupted profile resumes where it stopped. Each distinct prompt
runs once; it is written once per conversation it occurs in, under the source row's `id`
(`conversation#turn`), so train-proxy splits the profile by conversation exactly as it would
the source ("continue", in many conversations, then splits by its text in both).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from ssjf.assets import resolve_llm
from ssjf.config import EngineConfig
from .flags import config_args
from .data import conversation, load_rows
from ssjf.engine import Engine, RequestError
from ssjf.request import NullSink, Request, Sampling


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ssjf profile", description=__doc__)
    ap.add_argument("--data", action="append", required=True, help="prompt files (any supported format; repeatable)")
    ap.add_argument("--out", required=True, help="JSON lines to append to (resumable)")
    config_args(ap, ["model", "device", "dtype"])
    # greedy: either runner gives the same lengths; torch needs no vLLM install
    config_args(ap, ["runner"], runner="torch")
    ap.add_argument("--max-tokens", type=int, default=512, help="cap on each answer")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are skipped")
    ap.add_argument("--limit", type=int, default=0, help="profile at most this many new prompts")
    ap.add_argument("--batch", type=int, default=32, help="concurrent requests in the engine")
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)

    from tqdm import tqdm

    seen: set[str] = set()
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            seen = {json.loads(line)["prompt"] for line in f if line.strip()}
    homes: dict[str, dict[str, str]] = {}  # prompt -> {its conversation: the first source row id there}
    for path in args.data:
        for row in load_rows(path):
            if row.prompt not in seen:
                homes.setdefault(row.prompt, {}).setdefault(conversation(row.id), row.id)
    prompts = [(p, list(ids.values())) for p, ids in homes.items()]  # (prompt, source row ids)
    if args.limit:
        prompts = prompts[: args.limit]
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, policy="fcfs", runner=args.runner,
                          max_batch_size=args.batch, max_seq_len=args.max_prompt_tokens + args.max_tokens)
    engine = Engine(config)
    model_name = os.path.basename(os.path.normpath(resolve_llm(args.model))) or args.model
    pending = iter(enumerate(prompts))
    active: list[Request] = []
    texts: dict[str, tuple[str, list[str]]] = {}  # request id -> (prompt text, source row ids)
    skipped = 0
    bar = tqdm(total=len(prompts), unit="prompt", desc="profile")
    start = time.time()
    with open(args.out, "a", encoding="utf-8") as out:
        while True:
            while len(active) < args.batch:
                item = next(pending, None)
                if item is None:
                    break
                i, (prompt, source_ids) = item
                req = Request(f"p{i}", engine.encode_prompt(prompt), max_tokens=args.max_tokens, sink=NullSink(),
                              sampling=Sampling(temperature=args.temperature))
                try:
                    if req.prompt_len > args.max_prompt_tokens:
                        raise RequestError("prompt too long")
                    engine.check(req)
                except RequestError:
                    skipped += 1
                    bar.update(1)
                    continue
                texts[req.request_id] = (prompt, source_ids)
                engine.add_request(req)
                active.append(req)
            if not active:
                break
            engine.step()
            for req in [r for r in active if r.is_done]:
                active.remove(req)
                bar.update(1)
                prompt, source_ids = texts.pop(req.request_id)
                if req.finish_reason is None:
                    continue
                for source_id in source_ids:
                    out.write(json.dumps({"id": source_id, "prompt": prompt, "response": req.text,
                                          "length": len(req.output_ids), "finish_reason": req.finish_reason,
                                          "model": model_name}, ensure_ascii=False) + "\n")
                out.flush()
    bar.close()
    tokens = engine.generated_tokens
    print(f"profiled {len(prompts) - skipped} prompts ({skipped} skipped), {tokens} tokens in "
          f"{time.time() - start:.0f}s ({tokens / max(1e-9, time.time() - start):.0f} tokens/s) -> {args.out}")
    return 0


if __name__ == "__main__":
    main()
