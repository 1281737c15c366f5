"""`ssjf train-proxy`: fit a length head on prompt/response rows and save an artifact.

Objectives (on the same features, one small MLP):
  regression      mean squared error on log length;
  classification  cross-entropy over length buckets (training-set deciles); predicts the
                  expected log length under the bucket distribution;
  ranking         pairwise logistic loss (RankNet) on random pairs; a linear map of the
                  score to log length is fitted afterwards.
`--objective auto` trains all three and keeps the one with the best Kendall tau on a
validation split. Rows are split by prompt (a hash of its text), never by row: the same
prompt never sits in two splits, whichever models answered it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from .data import load_rows, parse_data_spec, response_lengths
from .eval_proxy import in_test_split, proxy_metrics
from .proxy import ARTIFACT_DIR, Encoder, Head, features, save_artifact

OBJECTIVES = ("regression", "classification", "ranking")


def _net(dim: int, hidden: int, out: int) -> torch.nn.Module:
    if hidden:
        return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                   torch.nn.Linear(hidden, out))
    return torch.nn.Sequential(torch.nn.Linear(dim, out))


def _arrays(net, mean, std) -> dict[str, np.ndarray]:
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    arrays = {"mean": mean, "std": std, "num_layers": np.int64(len(linears))}
    for i, lin in enumerate(linears):
        arrays[f"w{i}"] = lin.weight.detach().numpy().T.astype(np.float32)
        arrays[f"b{i}"] = lin.bias.detach().numpy().astype(np.float32)
    return arrays


def fit_head(objective: str, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             hidden: int = 256, epochs: int = 60, lr: float = 1e-3, weight_decay: float = 1e-4,
             seed: int = 0) -> tuple[dict[str, np.ndarray], float]:
    """Train one head on log lengths y; early-stops on validation Kendall tau. Returns (arrays, val tau)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mean) / std)
    yt = torch.tensor(y, dtype=torch.float32)
    extra: dict[str, np.ndarray] = {}
    if objective == "classification":
        edges = np.quantile(y, np.linspace(0, 1, 11)[1:-1])
        labels = torch.tensor(np.digitize(y, edges))
        extra["centers"] = np.array([np.median(y[labels.numpy() == k]) if (labels.numpy() == k).any() else 0.0
                                     for k in range(len(edges) + 1)], dtype=np.float32)
        out = len(edges) + 1
    else:
        out = 1
    net = _net(x.shape[1], hidden, out)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, patience = -2.0, None, 0
    batch = 256
    for epoch in range(epochs):
        net.train()
        for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // batch)):
            idx_t = torch.tensor(idx)
            pred = net(xt[idx_t])
            if objective == "regression":
                loss = torch.nn.functional.mse_loss(pred[:, 0], yt[idx_t])
            elif objective == "classification":
                loss = torch.nn.functional.cross_entropy(pred, labels[idx_t])
            else:  # every pair in the batch whose lengths differ
                s, t = pred[:, 0], yt[idx_t]
                diff_t = t[:, None] - t[None, :]
                pairs = diff_t.abs() > 0.05
                sign = torch.sign(diff_t)
                loss = torch.nn.functional.softplus(-sign * (s[:, None] - s[None, :]))[pairs].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        arrays = {**_arrays(net.eval(), mean, std), **extra}
        if objective == "ranking":
            score = Head(arrays).predict_log(x)
            a, b = np.polyfit(score, y, 1)
            arrays["calib"] = np.array([a, b], dtype=np.float32)
        tau = float(stats.kendalltau(Head(arrays).predict_log(x_val), y_val).statistic)
        if tau > best + 1e-4:
            best, best_state, patience = tau, arrays, 0
        else:
            patience += 1
            if patience >= 8:
                break
    return best_state, best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ssjf train-proxy", description=__doc__)
    ap.add_argument("--data", action="append", required=True, help="rows (any format; repeatable); path[@model,...]")
    ap.add_argument("--name", required=True, help="artifact name (saved with the package) or a .npz path")
    ap.add_argument("--objective", choices=("auto",) + OBJECTIVES, default="auto")
    ap.add_argument("--encoder", default="minilm", help="minilm (packaged) or any HF encoder folder / name")
    ap.add_argument("--encoder-layers", type=int, default=0, help="use only the first k layers (0 = all)")
    ap.add_argument("--max-length", type=int, default=256, help="encoder tokens per prompt")
    ap.add_argument("--encoder-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokenizer", default="smollm2", help="the served model whose tokens measure length")
    ap.add_argument("--condition-on-model", action="store_true", help="one-hot of the answering model as a feature")
    ap.add_argument("--target-model", default="", help="the model whose lengths serving predicts (conditioning)")
    ap.add_argument("--eval-models", default="", help="comma list: test metrics only on rows from these models")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=256, help="MLP hidden units (0 = linear head)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--report", help="write the comparison of objectives (JSON) here")
    args = ap.parse_args(argv)

    rows = []
    for spec in args.data:
        path, models = parse_data_spec(spec)
        rows.extend(r for r in load_rows(path, models) if r.response is not None or r.length is not None)
    lengths = np.asarray(response_lengths(rows, args.tokenizer), dtype=np.float64)
    y = np.log1p(lengths)
    prompts = [r.prompt for r in rows]
    test = np.array([in_test_split(p, args.test_fraction, args.seed) for p in prompts])
    val = ~test & np.array([in_test_split(p, 0.15, args.seed + 1) for p in prompts])
    train = ~test & ~val
    model_names = sorted({r.model for r in rows}) if args.condition_on_model else []
    index = {m: i for i, m in enumerate(model_names)}
    model_ids = np.array([index.get(r.model, 0) for r in rows]) if model_names else None
    t0 = time.time()
    encoder = Encoder(args.encoder, "cpu", args.max_length, args.encoder_layers, args.encoder_dtype)
    emb, plen = encoder.encode_cached(prompts)
    x = features(emb, plen, model_ids, len(model_names))
    print(f"{len(rows)} rows ({len(set(prompts))} prompts): train {train.sum()}, val {val.sum()}, "
          f"test {test.sum()}; features {x.shape[1]} in {time.time() - t0:.0f}s", flush=True)

    eval_rows = test.copy()
    if args.eval_models:
        eval_rows &= np.isin([r.model for r in rows], args.eval_models.split(","))
    edges = np.quantile(lengths[train], [0.2, 0.4, 0.6, 0.8]).tolist()
    results, heads = {}, {}
    for objective in OBJECTIVES if args.objective == "auto" else (args.objective,):
        t0 = time.time()
        arrays, val_tau = fit_head(objective, x[train], y[train], x[val], y[val], args.hidden, args.epochs,
                                   seed=args.seed)
        pred = np.expm1(Head(arrays).predict_log(x[eval_rows]))
        results[objective] = {"val_kendall_tau": val_tau, **proxy_metrics(pred, lengths[eval_rows], edges),
                              "train_s": round(time.time() - t0, 1)}
        heads[objective] = arrays
        print(f"{objective:15s} val tau {val_tau:.3f}  test {json.dumps(results[objective])}", flush=True)
    results["baselines"] = {
        "constant_mean": proxy_metrics(np.full(eval_rows.sum(), lengths[train].mean()), lengths[eval_rows], edges),
        "prompt_length": proxy_metrics(plen[eval_rows], lengths[eval_rows], edges),
    }
    chosen = max(heads, key=lambda k: results[k]["val_kendall_tau"])
    meta = {
        "objective": chosen,
        "encoder": {"name": args.encoder, "layers": args.encoder_layers, "max_length": args.max_length,
                    "dtype": args.encoder_dtype},
        "tokenizer": args.tokenizer, "models": model_names, "target_model": args.target_model,
        "data": args.data, "n_rows": len(rows), "test_fraction": args.test_fraction, "split_seed": args.seed,
        "bucket_edges": edges, "train_mean_length": float(lengths[train].mean()),
        "max_prediction": int(lengths.max() * 2), "test_metrics": results[chosen], "eval_models": args.eval_models,
    }
    out = Path(args.name) if args.name.endswith(".npz") else ARTIFACT_DIR / f"{args.name}.npz"
    save_artifact(out, heads[chosen], meta)
    print(f"chose {chosen} (best validation tau); saved {out} ({out.stat().st_size} bytes)")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"chosen": chosen, "results": results, "meta": meta}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
