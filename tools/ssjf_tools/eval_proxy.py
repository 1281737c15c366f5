"""`ssjf eval-proxy`: how well an artifact ranks and sizes output lengths on rows it never saw.

True length = the response's token count under the served model's tokenizer (or the row's
`length`). Report keys: n, kendall_tau, spearman, mae_tokens, bucket_accuracy (5 buckets at
the artifact's training-set length quintiles), p50_latency_ms (one prompt at a time), and
the same metrics for two baselines: a constant (the training mean) and the prompt length.
Where prompts recur (several models or samples answering one prompt), `prompt_ceiling` says how
much of the length the prompt can tell at all: the tau of each prompt's mean length (the best any
prompt-only score roughly does) and of the mean of its other answers (leave-one-out).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats

from .data import load_rows, parse_data_spec, response_lengths
from ssjf.config import RefreshConfig
from ssjf.cpus import machine

from .embeddings import cached_encode, encode_cached
from .report import emit
from .split import held_out


def proxy_metrics(pred: np.ndarray, true: np.ndarray, edges) -> dict:
    from ssjf.metrics import kendall_tau

    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    constant = np.ptp(pred) == 0
    return {
        "n": int(len(true)),
        "kendall_tau": kendall_tau(pred, true),
        "spearman": 0.0 if constant else float(stats.spearmanr(pred, true).statistic),
        "mae_tokens": float(np.mean(np.abs(pred - true))),
        "bucket_accuracy": float(np.mean(np.digitize(pred, edges) == np.digitize(true, edges))),
    }


def prompt_ceiling(prompts: list[str], true: np.ndarray, rows=None) -> dict | None:
    """Over `rows` (default all): Kendall tau of each prompt's mean log length, and of the mean of
    its other answers (rows whose prompt recurs), against the true lengths; None when no prompt recurs."""
    from ssjf.metrics import kendall_tau

    y = np.log1p(np.asarray(true, dtype=np.float64))
    _, group = np.unique(prompts, return_inverse=True)
    count, total = np.bincount(group)[group], np.bincount(group, weights=y)[group]
    if count.max() < 2:
        return None
    rows = np.arange(len(y)) if rows is None else np.asarray(rows)
    keep = rows[count[rows] > 1]
    return {"prompts": int(group.max() + 1), "rows": int(len(rows)),
            "prompt_mean_kendall_tau": kendall_tau((total / count)[rows], y[rows]),
            "leave_one_out_kendall_tau": kendall_tau(((total[keep] - y[keep]) / (count[keep] - 1)), y[keep])}


CHECKPOINTS = (100, 200, 400, 800)  # requests served


def online_replay(predictor, x: np.ndarray, true: np.ndarray, edges, refresh_every: int, window: int,
                  windows: int = 8, ahead: int = 200) -> dict:
    """The serving refresh, offline, with the server's own learner: each block of rows is predicted
    by the head in use, then its true lengths are learned and the head refitted
    (ssjf.proxy.learner.OnlineHead over the features the proxy sends, its own prediction last)."""
    from ssjf.metrics import kendall_tau
    from ssjf.proxy.learner import LastColumn, OnlineHead

    base = predictor.head.predict_log(x)
    served = np.hstack([x, base[:, None]]).astype(np.float32)  # what the proxy sends the llm
    head = OnlineHead(LastColumn(), window=window)
    pred_log = np.empty(len(true))
    checkpoints = []  # the head as it stood after n requests, on the `ahead` requests that came next
    for start in range(0, len(true), refresh_every):
        block = slice(start, start + refresh_every)
        pred_log[block] = head.predict_log(served[block])
        for xi, n in zip(served[block], true[block]):
            head.observe(xi, int(n))
        head.refit()
        done = min(start + refresh_every, len(true))
        for n in CHECKPOINTS:
            if start < n <= done and n + ahead <= len(true):  # a full window of requests after it
                nxt = slice(n, min(n + ahead, len(true)))
                checkpoints.append({"served": n, "rows": [n, nxt.stop],
                                    "kendall_tau": kendall_tau(head.predict_log(served[nxt]), true[nxt]),
                                    "frozen_kendall_tau": kendall_tau(base[nxt], true[nxt])})
    online, frozen = predictor.to_lengths(pred_log), predictor.to_lengths(base)
    half = slice(len(true) // 2, None)
    report = proxy_metrics(online[half], true[half], edges)
    report["frozen"] = proxy_metrics(frozen[half], true[half], edges)
    report["frozen_kendall_tau"] = report["frozen"]["kendall_tau"]
    bounds = np.linspace(0, len(true), windows + 1).astype(int)
    report["windows"] = [{"rows": [int(a), int(b)], "kendall_tau": proxy_metrics(online[a:b], true[a:b], edges)["kendall_tau"],
                          "frozen_kendall_tau": proxy_metrics(frozen[a:b], true[a:b], edges)["kendall_tau"]}
                         for a, b in zip(bounds[:-1], bounds[1:])]
    report["checkpoints"] = checkpoints
    report["refits"] = {"swapped": head.version, "rejected": head.rejected, "every_rows": refresh_every, "window": window}
    return report


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
    ap.add_argument("--dtype", default="auto", help="the encoder's dtype (auto: bf16 where the CPU computes it natively)")
    ap.add_argument("--online", action="store_true",
                    help="replay the rows in order as the serving refresh would: predict each block of rows, then "
                         "learn from their true lengths and refit; kendall_tau (and the other metrics) are over the "
                         "second half of the rows, frozen_kendall_tau is the starting artifact alone on the same rows")
    ap.add_argument("--refresh-every", type=int, default=50, help="--online: rows between refits")
    ap.add_argument("--window", type=int, default=RefreshConfig.window,
                    help="--online: recent rows the refit learns from (default: the server's)")
    ap.add_argument("--shuffle-seed", type=int, help="--online: replay the rows in a seeded random order instead "
                                                      "of the file's")
    ap.add_argument("--distinct-prompts", action="store_true",
                    help="keep one row per prompt (the first, after any shuffle): a stream where no prompt recurs, "
                         "so a learner cannot look up answers it has seen")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    predictor = LengthPredictor(args.artifact, dtype=args.dtype)
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
    if args.online and args.shuffle_seed is not None:
        rows = [rows[i] for i in np.random.default_rng(args.shuffle_seed).permutation(len(rows))]
    if args.distinct_prompts:
        seen: set[str] = set()
        rows = [r for r in rows if not (r.prompt in seen or seen.add(r.prompt))]
    true = np.asarray(response_lengths(rows, args.tokenizer or meta.get("tokenizer", "smollm2")), dtype=np.float64)
    prompts = [r.prompt for r in rows]
    models = [r.model for r in rows] if predictor.models else None
    edges = meta["bucket_edges"]
    if args.online:
        report = online_replay(predictor, predictor.features(prompts, models, cached_encode(predictor)), true, edges,
                               args.refresh_every, args.window)
    else:
        report = proxy_metrics(predictor.predict(prompts, models, cached_encode(predictor)), true, edges)
    half = np.arange(len(true) // 2, len(true)) if args.online else None
    report["prompt_ceiling"] = prompt_ceiling(prompts, true, half)  # over the rows kendall_tau is over
    report["p50_latency_ms"] = latency_ms(predictor, prompts)
    plen = encode_cached(predictor.encoder, prompts)[1]
    report["baselines"] = {
        "constant_mean": proxy_metrics(np.full(len(true), meta.get("train_mean_length", true.mean())), true, edges),
        "prompt_length": proxy_metrics(plen, true, edges),
    }
    report["artifact"] = {"name": args.artifact, "objective": meta.get("objective"), "encoder": meta["encoder"],
                          "served_dtype": predictor.encoder.dtype_name}
    report["machine"] = machine()
    return emit(report, args.out)


if __name__ == "__main__":
    main()
