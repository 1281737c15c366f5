"""`ssjf eval-proxy`: how well an artifact ranks and sizes output lengths on rows it never saw.

True length = the response's token count under the served model's tokenizer (or the row's
`length`). Report keys: n, kendall_tau, spearman, mae_tokens, bucket_accuracy (5 buckets at
the artifact's training-set length quintiles), p50_latency_ms (one prompt at a time), and
the same metrics for two baselines: a constant (the training mean) and the prompt length.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats

from .data import load_rows, parse_data_spec, response_lengths
from .report import emit
from .split import held_out


def proxy_metrics(pred: np.ndarray, true: np.ndarray, edges) -> dict:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    constant = np.ptp(pred) == 0
    return {
        "n": int(len(true)),
        "kendall_tau": 0.0 if constant else float(stats.kendalltau(pred, true).statistic),
        "spearman": 0.0 if constant else float(stats.spearmanr(pred, true).statistic),
        "mae_tokens": float(np.mean(np.abs(pred - true))),
        "bucket_accuracy": float(np.mean(np.digitize(pred, edges) == np.digitize(true, edges))),
    }


def latency_ms(predictor, prompts: list[str], n: int = 50) -> float:
    sample = prompts[:: max(1, len(prompts) // n)][:n]
    predictor.encoder.warm_up()  # as the served length_predictor does at load
    predictor.predict(sample[:3])
    times = []
    for p in sample:
        t = time.perf_counter()
        predictor.predict([p])
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def main(argv=None) -> dict:
    from ssjf.proxy import LengthPredictor

    ap = argparse.ArgumentParser(prog="ssjf eval-proxy", description=__doc__)
    ap.add_argument("--data", action="append", required=True, help="rows (any supported format); path[@model,...]")
    ap.add_argument("--artifact", default="smollm2")
    ap.add_argument("--out", help="write the report (JSON) here")
    ap.add_argument("--tokenizer", help="count true lengths with this model's tokenizer (default: the artifact's)")
    ap.add_argument("--split", choices=["all", "test"], default="all",
                    help="test: only rows in the artifact's test split, by conversation or prompt as its "
                         "metadata records (for the training data)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the latency measurement")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    predictor = LengthPredictor(args.artifact)
    meta = predictor.meta
    rows = []
    for spec in args.data:
        path, models = parse_data_spec(spec)
        rows.extend(load_rows(path, models))
    if args.split == "test":
        rows = [r for r in rows if held_out(r, meta)]
    rows = [r for r in rows if r.response is not None or r.length is not None]
    if not rows:
        raise SystemExit("no rows with a response or length")
    true = np.asarray(response_lengths(rows, args.tokenizer or meta.get("tokenizer", "smollm2")), dtype=np.float64)
    prompts = [r.prompt for r in rows]
    models = [r.model for r in rows] if predictor.models else None
    pred = predictor.predict(prompts, models, cached=True)
    edges = meta["bucket_edges"]
    report = proxy_metrics(pred, true, edges)
    report["p50_latency_ms"] = latency_ms(predictor, prompts)
    plen = predictor.encoder.encode_cached(prompts)[1]
    report["baselines"] = {
        "constant_mean": proxy_metrics(np.full(len(true), meta.get("train_mean_length", true.mean())), true, edges),
        "prompt_length": proxy_metrics(plen, true, edges),
    }
    report["artifact"] = {"name": args.artifact, "objective": meta.get("objective"), "encoder": meta["encoder"]}
    return emit(report, args.out)


if __name__ == "__main__":
    main()
