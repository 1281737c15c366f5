"""`ssjf loso`: leave-one-source-out evaluation of the proxy's objectives and targets.

For each named source, a head is trained on every other source and scored (Kendall tau) on the
left-out one: one row per distinct prompt, all of it, since none of it was seen. An
in-distribution column trains on every source's train split and scores each test split (the
split every tool shares), the number a single-source report would quote.

Targets:
  log       log length, as the served artifacts are trained;
  source-z  log length standardised within each (source, answering model): what is long *for
            that model*. Verbosity differs between models several-fold, so pooled raw lengths
            teach the head to recognise the source instead of the prompt's demand.
`--pool` trains on each prompt's mean target over all its answers (AlpacaEval's 12 models); the
scores stay on single answers.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .data import load_rows, parse_data_spec, response_lengths
from .embeddings import encode_cached
from .split import in_test_split, prompt_digest, split_key, split_meta
from .train_proxy import OBJECTIVES, fit_head, pooled_targets, standardise
from ssjf.proxy.encoder import Encoder
from ssjf.proxy.head import Head, features

TARGETS = ("log", "source-z")


@dataclass
class Source:
    name: str
    prompts: list[str]
    y: np.ndarray  # log1p length
    group: np.ndarray  # (source, model) group id per row, for per-group standardisation
    test: np.ndarray  # the shared split's test rows
    val: np.ndarray  # validation rows (from the non-test rows)
    first: np.ndarray  # the first row of each distinct prompt: what a left-out score counts


def load_source(name: str, spec: str, tokenizer: str, seed: int, group_base: int, max_prompts: int = 0) -> Source:
    path, models = parse_data_spec(spec)
    rows = [r for r in load_rows(path, models) if r.response is not None or r.length is not None]
    if max_prompts:  # a deterministic sample of the distinct prompts (by digest), all their rows
        keep = set(sorted({r.prompt for r in rows}, key=prompt_digest)[:max_prompts])
        rows = [r for r in rows if r.prompt in keep]
    y = np.log1p(np.asarray(response_lengths(rows, tokenizer), dtype=np.float64))
    shared = set(split_meta(rows)["shared_prompts"])
    keys = [split_key(r, shared) for r in rows]
    test = np.array([in_test_split(k, 0.2, seed) for k in keys])
    val = ~test & np.array([in_test_split(k, 0.15, seed + 1) for k in keys])
    names = sorted({r.model for r in rows})
    group = np.array([group_base + names.index(r.model) for r in rows])
    seen: set[str] = set()
    first = np.array([not (r.prompt in seen or seen.add(r.prompt)) for r in rows])
    return Source(name, [r.prompt for r in rows], y, group, test, val, first)


def _tau(pred: np.ndarray, y: np.ndarray) -> float:
    return float(stats.kendalltau(pred, y).statistic)


def run(sources: list[Source], x: np.ndarray, objective: str, target: str, pool: bool, seed: int,
        hidden: int, left_out: bool = True) -> dict[str, float]:
    """Left-out tau per source (or in-distribution tau per source when left_out is False)."""
    offsets = np.cumsum([0] + [len(s.prompts) for s in sources])
    y = np.concatenate([s.y for s in sources])
    group = np.concatenate([s.group for s in sources])
    prompts = [p for s in sources for p in s.prompts]
    src = np.concatenate([np.full(len(s.prompts), i) for i, s in enumerate(sources)])
    test = np.concatenate([s.test for s in sources])
    val = np.concatenate([s.val for s in sources])
    first = np.concatenate([s.first for s in sources])
    out = {}
    for i, s in enumerate(sources if left_out else [None]):
        train_rows = ~test & ~val if not left_out else (src != i) & ~val
        val_rows = val if not left_out else (src != i) & val
        t = standardise(y, group, train_rows) if target == "source-z" else y
        t_fit = pooled_targets(prompts, t, train_rows) if pool else t
        arrays, _ = fit_head(objective, x[train_rows], t_fit[train_rows], x[val_rows], t[val_rows], hidden, seed=seed)
        head = Head(arrays)
        if left_out:
            rows = np.arange(offsets[i], offsets[i + 1])[first[offsets[i]:offsets[i + 1]]]
            out[s.name] = _tau(head.predict_log(x[rows]), y[rows])
        else:
            for j, s2 in enumerate(sources):
                rows = np.arange(offsets[j], offsets[j + 1])[test[offsets[j]:offsets[j + 1]]]
                out[s2.name] = _tau(head.predict_log(x[rows]), y[rows])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ssjf loso", description=__doc__)
    ap.add_argument("--source", action="append", required=True, help="NAME=path[@model,...] (repeatable, at least 2)")
    ap.add_argument("--objectives", default="classification,ranking", help=f"comma list of {', '.join(OBJECTIVES)}")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    ap.add_argument("--pool", action="store_true", help="train on each prompt's mean target over its answers")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--encoder-layers", type=int, default=3)
    ap.add_argument("--pooling", choices=["mean", "last"], default="mean")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--encoder-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--tokenizer", default="smollm2")
    ap.add_argument("--max-prompts", type=int, default=0, help="at most this many distinct prompts per source (0 = all)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results (JSON) here")
    args = ap.parse_args(argv)

    sources = []
    for n, item in enumerate(args.source):
        name, sep, spec = item.partition("=")
        if not sep:
            ap.error(f"--source {item!r}: expected NAME=path")
        sources.append(load_source(name, spec, args.tokenizer, args.seed, 1000 * n, args.max_prompts))
    if len(sources) < 2:
        ap.error("leave-one-source-out needs at least two sources")
    t0 = time.time()
    encoder = Encoder(args.encoder, "cpu", args.max_length, args.encoder_layers, args.encoder_dtype, args.pooling)
    emb, plen = encode_cached(encoder, [p for s in sources for p in s.prompts])
    x = features(emb, plen)
    print(" ".join(f"{s.name}:{len(s.prompts)}/{int(s.first.sum())}" for s in sources),
          f"rows/prompts; features in {time.time() - t0:.0f}s", flush=True)

    results = {"sources": [s.name for s in sources], "encoder": vars(args) | {"source": None}, "rows": {}}
    y = np.concatenate([s.y for s in sources])
    first = np.concatenate([s.first for s in sources])
    offsets = np.cumsum([0] + [len(s.prompts) for s in sources])
    results["rows"]["prompt length"] = {
        s.name: _tau(plen[offsets[i]:offsets[i + 1]][s.first], y[offsets[i]:offsets[i + 1]][s.first])
        for i, s in enumerate(sources)}
    for objective in args.objectives.split(","):
        for target in args.targets.split(","):
            t0 = time.time()
            key = f"{objective}, {target}" + (", pooled" if args.pool else "")
            row = run(sources, x, objective, target, args.pool, args.seed, args.hidden)
            row["mean"] = float(np.mean(list(row.values())))
            row["min"] = float(min(v for k, v in row.items() if k != "mean"))
            inside = run(sources, x, objective, target, args.pool, args.seed, args.hidden, left_out=False)
            row["in-distribution"] = float(np.mean(list(inside.values())))
            results["rows"][key] = row
            print(f"{key:40s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()) + f" ({time.time() - t0:.0f}s)",
                  flush=True)
    names = [s.name for s in sources]
    print("\n| predictor | " + " | ".join(names) + " | mean | min | in-distribution |")
    print("|---" * (len(names) + 4) + "|")
    for key, row in results["rows"].items():
        cells = [f"{row[n]:.3f}" for n in names] + [f"{row[k]:.3f}" if k in row else "" for k in ("mean", "min", "in-distribution")]
        print(f"| {key} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
