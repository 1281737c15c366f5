"""`ssjf train-proxy`: fit the length head on prompt/response rows and save an artifact.

Rows are split by prompt (a hash of the prompt text), never by row, so the same prompt
never sits in both train and test. Lengths are the response's token count under the
served model's tokenizer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from .assets import resolve_llm
from .data import load_jsonl
from .proxy import ARTIFACT_DIR, Encoder, features, fit_ridge, save_artifact


def in_test_split(prompt: str, test_fraction: float, seed: int = 0) -> bool:
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def token_lengths(responses: list[str], tokenizer_name: str) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_llm(tokenizer_name))
    return np.asarray([max(1, len(ids)) for ids in tok(responses, add_special_tokens=False)["input_ids"]], dtype=np.float32)


def bucket_accuracy(pred: np.ndarray, true: np.ndarray, edges: np.ndarray) -> float:
    return float(np.mean(np.digitize(pred, edges) == np.digitize(true, edges)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ssjf train-proxy", description=__doc__)
    ap.add_argument("--data", action="append", required=True, help="JSON lines (repeatable); path[:model,model]")
    ap.add_argument("--name", default="recorded", help="artifact name (saved in the package) or a .npz path")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--tokenizer", default="smollm2", help="the served model whose tokens count length")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--alpha", type=float, default=30.0)
    args = ap.parse_args(argv)

    rows = []
    for spec in args.data:
        path, _, models = spec.partition(":")
        rows.extend(load_jsonl(path, set(models.split(",")) if models else None))
    rows = [r for r in rows if r.response]
    prompts = [r.prompt for r in rows]
    y = np.log1p(token_lengths([r.response for r in rows], args.tokenizer))
    test = np.array([in_test_split(p, args.test_fraction) for p in prompts])
    t0 = time.time()
    encoder = Encoder(args.encoder)
    emb, plen = encoder.encode(prompts)
    x = features(emb, plen)
    print(f"encoded {len(rows)} prompts in {time.time() - t0:.0f}s; train {int((~test).sum())}, test {int(test.sum())}")
    w, b, mean, std = fit_ridge(x[~test], y[~test], args.alpha)
    pred = ((x[test] - mean) / std) @ w + b
    true_len, pred_len = np.expm1(y[test]), np.expm1(pred)
    edges = np.quantile(np.expm1(y[~test]), [0.2, 0.4, 0.6, 0.8])
    metrics = {
        "n_test": int(test.sum()),
        "kendall_tau": float(stats.kendalltau(pred, y[test]).statistic),
        "spearman": float(stats.spearmanr(pred, y[test]).statistic),
        "mae_tokens": float(np.mean(np.abs(pred_len - true_len))),
        "bucket_accuracy": bucket_accuracy(pred_len, true_len, edges),
    }
    print(json.dumps(metrics, indent=2))
    # refit on everything for the shipped artifact
    w, b, mean, std = fit_ridge(x, y, args.alpha)
    meta = {"encoder": args.encoder, "max_length": encoder.max_length, "tokenizer": args.tokenizer,
            "head": "ridge_log_length", "alpha": args.alpha, "data": args.data, "n_rows": len(rows),
            "bucket_edges": edges.tolist(), "test_metrics": metrics}
    out = Path(args.name) if args.name.endswith(".npz") else ARTIFACT_DIR / f"{args.name}.npz"
    save_artifact(out, w, b, mean, std, meta)
    print(f"saved {out} ({out.stat().st_size} bytes)")
    return metrics


if __name__ == "__main__":
    main()
