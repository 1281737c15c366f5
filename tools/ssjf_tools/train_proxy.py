"""`ssjf train-proxy`: fit a length head on prompt/response rows and save an artifact.

Objectives (on the same features, one small MLP):
  regression      mean squared error on log length;
  classification  cross-entropy over length buckets (training-set deciles); predicts the
                  expected log length under the bucket distribution;
  ranking         pairwise logistic loss (RankNet) on random pairs; a linear map of the
                  score to log length is fitted afterwards;
  hybrid          regression plus the pairwise loss: sizes and orders at once.
`--objective auto` trains all four and keeps the one with the best Kendall tau on a
validation split. `--finetune-rank R` then trains the encoder too, end to end with the
chosen objective: low-rank adapters (rank R) on every linear layer of the kept layers, and
their LayerNorms, starting from the trained head. The epoch with the best validation tau is
kept if it beats the frozen encoder's, and its adapters ship inside the artifact.
Rows are split by conversation where the data has them (ids `conversation#turn`), else by
prompt, never by row: the same prompt never sits in two splits, whichever models answered it,
and a conversation's turns stay together (see split.split_key).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from .embeddings import encode_cached
from .data import load_rows, parse_data_spec, response_lengths
from .eval_proxy import proxy_metrics
from .split import in_test_split, split_key, split_meta
from ssjf.proxy.encoder import ADAPTER, Encoder
from ssjf.proxy.head import Head, features
from ssjf.proxy.predictor import user_artifacts

OBJECTIVES = ("regression", "classification", "ranking", "hybrid")


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank update b @ a (b starts at zero)."""

    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T) @ self.b.T


def add_adapters(encoder, rank: int) -> list[torch.nn.Parameter]:
    """Freeze the encoder, wrap every linear layer of its layer stack in a LoRALinear and
    unfreeze the stack's LayerNorms; returns the trainable parameters."""
    for p in encoder.model.parameters():
        p.requires_grad = False
    encoder._fast, encoder.lean = None, False
    stack = encoder.layer_stack()
    for name, module in list(stack.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            setattr(stack.get_submodule(parent_name), attr, LoRALinear(module, rank))
        elif isinstance(module, torch.nn.LayerNorm):
            for p in module.parameters():
                p.requires_grad = True
    return [p for p in encoder.model.parameters() if p.requires_grad]


def adapter_arrays(encoder) -> dict[str, np.ndarray]:
    """The trained adapters as artifact arrays (float16 low-rank factors, float32 norms)."""
    out = {}
    for name, module in encoder.layer_stack().named_modules():
        if isinstance(module, LoRALinear):
            out[f"{ADAPTER}{name}.a"] = module.a.detach().numpy().astype(np.float16)
            out[f"{ADAPTER}{name}.b"] = module.b.detach().numpy().astype(np.float16)
        elif isinstance(module, torch.nn.LayerNorm):
            out[f"{ADAPTER}{name}.weight"] = module.weight.detach().numpy().astype(np.float32)
            out[f"{ADAPTER}{name}.bias"] = module.bias.detach().numpy().astype(np.float32)
    return out


def save_artifact(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """An artifact: the head's arrays (and any adapters) plus `meta`, a JSON string (ssjf.proxy.predictor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, meta=np.asarray(json.dumps(meta)), **arrays)


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


def _loss(objective: str, pred: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """pred: the net's output for a batch; t: log lengths; labels: bucket per row (classification)."""
    if objective == "regression":
        return torch.nn.functional.mse_loss(pred[:, 0], t)
    if objective == "classification":
        return torch.nn.functional.cross_entropy(pred, labels)
    s = pred[:, 0]  # ranking: every pair in the batch whose lengths differ
    diff_t = t[:, None] - t[None, :]
    pairs = diff_t.abs() > 0.05
    rank = (torch.nn.functional.softplus(-torch.sign(diff_t) * (s[:, None] - s[None, :]))[pairs].mean()
            if pairs.any() else s.sum() * 0.0)
    return rank + torch.nn.functional.mse_loss(s, t) if objective == "hybrid" else rank


def pooled_targets(prompts: list[str], y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each selected row's target replaced by the mean of y over the selected rows with its prompt."""
    sums: dict[str, list[float]] = {}
    for p, v, keep in zip(prompts, y, rows):
        if keep:
            sums.setdefault(p, []).append(v)
    return np.array([np.mean(sums[p]) if keep else v for p, v, keep in zip(prompts, y, rows)])


def standardise(y: np.ndarray, group: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """y standardised within each group (a source and its answering model), with each group's mean
    and spread taken from `rows`: what is long *for that model*, whatever its verbosity."""
    out = y.copy()
    for g in np.unique(group):
        fit = rows & (group == g)
        if fit.sum() > 1:
            out[group == g] = (y[group == g] - y[fit].mean()) / (y[fit].std() + 1e-6)
    return out


def to_log_lengths(arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> None:
    """A head trained on standardised targets: map its output to log lengths, linearly, by least
    squares over training rows (a classification head's bucket centres, else its calibration)."""
    a, b = np.polyfit(Head(arrays).predict_log(x), y, 1)
    if "centers" in arrays:  # the expectation over buckets is linear in the centres
        arrays["centers"] = (a * arrays["centers"] + b).astype(np.float32)
    else:
        c = arrays.get("calib", np.array([1.0, 0.0]))
        arrays["calib"] = np.array([a * c[0], a * c[1] + b], dtype=np.float32)


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
        extra["edges"] = edges.astype(np.float32)
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
            loss = _loss(objective, net(xt[idx_t]), yt[idx_t], labels[idx_t] if objective == "classification" else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        arrays = {**_arrays(net.eval(), mean, std), **extra}
        if objective == "ranking":
            _calibrate(arrays, x, y)
        tau = float(stats.kendalltau(Head(arrays).predict_log(x_val), y_val).statistic)
        if tau > best + 1e-4:
            best, best_state, patience = tau, arrays, 0
        else:
            patience += 1
            if patience >= 8:
                break
    return best_state, best


def _calibrate(arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> None:
    """Ranking: map the score to log length linearly (least squares on the training rows)."""
    arrays.pop("calib", None)
    a, b = np.polyfit(Head(arrays).predict_log(x), y, 1)
    arrays["calib"] = np.array([a, b], dtype=np.float32)


def _net_from(arrays: dict[str, np.ndarray]) -> torch.nn.Module:
    n = int(arrays["num_layers"])
    ws = [(torch.tensor(arrays[f"w{i}"].T.copy()), torch.tensor(arrays[f"b{i}"].copy())) for i in range(n)]
    net = _net(ws[0][0].shape[1], ws[0][0].shape[0] if n > 1 else 0, ws[-1][0].shape[0])
    for lin, (w, b) in zip([m for m in net if isinstance(m, torch.nn.Linear)], ws):
        lin.weight.data.copy_(w)
        lin.bias.data.copy_(b)
    return net


def finetune(objective: str, arrays: dict[str, np.ndarray], encoder: Encoder, prompts: list[str], y: np.ndarray,
             train: np.ndarray, val: np.ndarray, model_ids: np.ndarray | None, num_models: int, rank: int,
             frozen_tau: float = -2.0, epochs: int = 12, lr: float = 2e-3, encoder_lr: float | None = None,
             batch: int = 32, seed: int = 0, log=print) -> tuple[dict[str, np.ndarray] | None, float]:
    """Train adapters in `encoder` (float32) and the head end to end, from the head in `arrays`.
    Rows are grouped by prompt: one encoder pass per prompt feeds all its rows (answering models).
    Returns (head arrays + adapter arrays of the best epoch by validation tau, that tau), or
    (None, frozen_tau) when no epoch beats the frozen encoder's validation tau."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = add_adapters(encoder, rank)
    net = _net_from(arrays)
    mean, std = torch.tensor(arrays["mean"]), torch.tensor(arrays["std"])
    extra = {k: arrays[k] for k in ("edges", "centers") if k in arrays}
    labels = np.digitize(y, arrays["edges"]) if objective == "classification" else None  # the head's buckets
    unique = sorted(set(prompts))
    pid = {p: i for i, p in enumerate(unique)}
    rows_of: dict[int, list[int]] = {}
    for i in np.flatnonzero(train):
        rows_of.setdefault(pid[prompts[i]], []).append(i)
    prompt_ids = np.array(sorted(rows_of))
    ntok = {i: len(unique[i]) for i in prompt_ids}
    opt = torch.optim.AdamW([{"params": params, "lr": lr if encoder_lr is None else encoder_lr},
                             {"params": list(net.parameters()), "lr": lr}], weight_decay=1e-4)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    steps = epochs * math.ceil(len(prompt_ids) / batch)
    step = 0

    def rows_features(emb: torch.Tensor, plen: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        parts = [emb, torch.log1p(plen)[:, None]]
        if num_models:
            parts.append(torch.nn.functional.one_hot(torch.tensor(model_ids[rows]), num_models).float())
        return (torch.cat(parts, 1) - mean) / std

    def embed_rows(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            emb, plen = encoder.encode([prompts[i] for i in rows])
        return features(emb, plen, model_ids[rows] if num_models else None, num_models)

    best, best_arrays = frozen_tau, None  # the frozen encoder's head is the bar to beat
    val_rows = np.flatnonzero(val)
    encoder.model.eval()
    start = float(stats.kendalltau(Head(arrays).predict_log(embed_rows(val_rows)), y[val_rows]).statistic)
    log(f"  finetune start: val tau {start:.3f} (adapters at zero; the frozen head had {frozen_tau:.3f})")
    for epoch in range(epochs):
        t0 = time.time()
        encoder.model.train()
        net.train()
        perm = rng.permutation(prompt_ids)
        for start in range(0, len(perm), batch * 8):  # similar lengths together inside each chunk
            chunk = sorted(perm[start : start + batch * 8], key=ntok.get)
            for b in range(0, len(chunk), batch):
                ids = chunk[b : b + batch]
                emb, plen = encoder.forward([unique[i] for i in ids])
                where = [(j, r) for j, i in enumerate(ids) for r in rows_of[i]]
                rows = np.array([r for _, r in where])
                pred = net(rows_features(emb[[j for j, _ in where]], plen[[j for j, _ in where]], rows))
                loss = _loss(objective, pred, torch.tensor(y[rows], dtype=torch.float32),
                             torch.tensor(labels[rows]) if labels is not None else None)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
                step += 1
                opt.zero_grad()
                loss.backward()
                opt.step()
        encoder.model.eval()
        head = {**_arrays(net.eval(), arrays["mean"], arrays["std"]), **extra}
        if objective == "ranking":
            sample = rng.choice(np.flatnonzero(train), min(2000, int(train.sum())), replace=False)
            _calibrate(head, embed_rows(sample), y[sample])
        tau = float(stats.kendalltau(Head(head).predict_log(embed_rows(val_rows)), y[val_rows]).statistic)
        log(f"  finetune epoch {epoch}: val tau {tau:.3f} ({time.time() - t0:.0f}s)")
        if tau > best + 1e-4:
            best, best_arrays = tau, {**head, **adapter_arrays(encoder)}
    return best_arrays, best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ssjf train-proxy", description=__doc__)
    ap.add_argument("--data", action="append", required=True, help="rows (any format; repeatable); path[@model,...]")
    ap.add_argument("--name", required=True, help="artifact name (saved under $SSJF_CACHE_DIR/artifacts, where the server finds it) or a .npz path")
    ap.add_argument("--objective", choices=("auto",) + OBJECTIVES, default="auto")
    ap.add_argument("--encoder", default="minilm",
                    help="minilm (packaged), smollm2 (the served LLM), or any HF model folder / name")
    ap.add_argument("--pooling", choices=["mean", "last"], default="mean",
                    help="mean over tokens (sentence encoders) or the last token after the chat template (LLMs)")
    ap.add_argument("--encoder-layers", type=int, default=0, help="use only the first k layers (0 = all)")
    ap.add_argument("--max-length", type=int, default=256, help="encoder tokens per prompt")
    ap.add_argument("--encoder-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokenizer", default="smollm2", help="the served model whose tokens measure length")
    ap.add_argument("--condition-on-model", action="store_true", help="one-hot of the answering model as a feature")
    ap.add_argument("--pool-models", action="store_true",
                    help="train on each prompt's mean log length over every answer it has (several models' answers "
                         "in AlpacaEval): the prompt's expected length, less noisy than one sample; tests stay per row")
    ap.add_argument("--target", choices=("log", "source-z"), default="log",
                    help="log: log length; source-z: log length standardised within each --data source and answering "
                         "model (what is long for that model; mapped back to log lengths after training). Transfers "
                         "better across sources whose models differ in verbosity (see docs/proxy.md)")
    ap.add_argument("--target-model", default="", help="the model whose lengths serving predicts (conditioning)")
    ap.add_argument("--eval-models", default="", help="comma list: test metrics only on rows from these models")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=256, help="MLP hidden units (0 = linear head)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--finetune-rank", type=int, default=0,
                    help="also fine-tune the encoder with low-rank adapters of this rank (0 = frozen encoder)")
    ap.add_argument("--finetune-epochs", type=int, default=12)
    ap.add_argument("--finetune-lr", type=float, default=2e-3, help="the head's learning rate")
    ap.add_argument("--finetune-encoder-lr", type=float, help="the adapters' learning rate (default: --finetune-lr)")
    ap.add_argument("--report", help="write the comparison of objectives (JSON) here")
    args = ap.parse_args(argv)
    if args.finetune_rank and args.target != "log":
        ap.error("--finetune-rank trains on log lengths only (--target log)")

    rows, groups = [], []
    for n, spec in enumerate(args.data):
        path, models = parse_data_spec(spec)
        rows.extend(r for r in load_rows(path, models) if r.response is not None or r.length is not None)
        groups.extend(f"{n}:{r.model}" for r in rows[len(groups):])
    lengths = np.asarray(response_lengths(rows, args.tokenizer), dtype=np.float64)
    y = np.log1p(lengths)
    prompts = [r.prompt for r in rows]
    split = split_meta(rows)
    shared = set(split["shared_prompts"])
    keys = [split_key(r, shared) for r in rows]
    test = np.array([in_test_split(k, args.test_fraction, args.seed) for k in keys])
    val = ~test & np.array([in_test_split(k, 0.15, args.seed + 1) for k in keys])
    train = ~test & ~val
    model_names = sorted({r.model for r in rows}) if args.condition_on_model else []
    index = {m: i for i, m in enumerate(model_names)}
    model_ids = np.array([index.get(r.model, 0) for r in rows]) if model_names else None
    t0 = time.time()
    encoder = Encoder(args.encoder, "cpu", args.max_length, args.encoder_layers, args.encoder_dtype, args.pooling)
    emb, plen = encode_cached(encoder, prompts)
    x = features(emb, plen, model_ids, len(model_names))
    print(f"{len(rows)} rows ({len(set(prompts))} prompts): train {train.sum()}, val {val.sum()}, "
          f"test {test.sum()}; features {x.shape[1]} in {time.time() - t0:.0f}s", flush=True)

    eval_rows = test.copy()
    if args.eval_models:
        eval_rows &= np.isin([r.model for r in rows], args.eval_models.split(","))
    edges = np.quantile(lengths[train], [0.2, 0.4, 0.6, 0.8]).tolist()
    y_fit = y
    if args.target == "source-z":
        y_fit = standardise(y, np.unique(groups, return_inverse=True)[1], train)
    y_fit = pooled_targets(prompts, y_fit, train) if args.pool_models else y_fit
    results, heads = {}, {}
    for objective in OBJECTIVES if args.objective == "auto" else (args.objective,):
        t0 = time.time()
        arrays, val_tau = fit_head(objective, x[train], y_fit[train], x[val], y_fit[val], args.hidden, args.epochs,
                                   seed=args.seed)
        if args.target != "log":
            to_log_lengths(arrays, x[train], y[train])
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
    final = heads[chosen]
    if args.finetune_rank:
        t0 = time.time()
        print(f"fine-tuning the encoder ({chosen}, rank {args.finetune_rank})", flush=True)
        trainable = Encoder(args.encoder, "cpu", args.max_length, args.encoder_layers, "float32", args.pooling)
        tuned, val_tau = finetune(chosen, heads[chosen], trainable, prompts, y_fit, train, val, model_ids,
                                  len(model_names), args.finetune_rank, results[chosen]["val_kendall_tau"],
                                  args.finetune_epochs, args.finetune_lr, args.finetune_encoder_lr, seed=args.seed,
                                  log=lambda m: print(m, flush=True))
        if tuned is None:
            print(f"fine-tuning did not beat the frozen encoder on validation; keeping {chosen} (frozen)")
            results["finetune"] = {"kept": False, "train_s": round(time.time() - t0, 1)}
        else:
            final = tuned
            # test metrics through the serving path: the adapters merged into the frozen encoder loaded
            # above (the serving dtype), as LengthPredictor will merge them
            encoder.load_adapters({k: v for k, v in final.items() if k.startswith(ADAPTER)})
            emb_t, plen_t = encoder.encode([prompts[i] for i in np.flatnonzero(eval_rows)])
            x_t = features(emb_t, plen_t, model_ids[eval_rows] if model_names else None, len(model_names))
            pred = np.expm1(Head(final).predict_log(x_t))
            chosen = f"{chosen}+finetune"
            results[chosen] = {"val_kendall_tau": val_tau, **proxy_metrics(pred, lengths[eval_rows], edges),
                               "train_s": round(time.time() - t0, 1), "rank": args.finetune_rank}
            print(f"{chosen:15s} val tau {val_tau:.3f}  test {json.dumps(results[chosen])}", flush=True)
    meta = {
        "objective": chosen,
        "encoder": {"name": args.encoder, "layers": args.encoder_layers, "max_length": args.max_length,
                    "dtype": args.encoder_dtype, "pooling": args.pooling},
        "tokenizer": args.tokenizer, "target": args.target, "models": model_names, "target_model": args.target_model,
        "data": args.data, "n_rows": len(rows), "test_fraction": args.test_fraction, "split_seed": args.seed,
        "split": split,
        "finetune": {"rank": args.finetune_rank, "epochs": args.finetune_epochs, "lr": args.finetune_lr,
                     "encoder_lr": args.finetune_encoder_lr}
        if chosen.endswith("+finetune") else None,
        "bucket_edges": edges, "train_mean_length": float(lengths[train].mean()),
        "max_prediction": int(lengths.max() * 2), "test_metrics": results[chosen], "eval_models": args.eval_models,
    }
    out = Path(args.name) if args.name.endswith(".npz") else user_artifacts() / f"{args.name}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_artifact(out, final, meta)
    print(f"chose {chosen} (best validation tau); saved {out} ({out.stat().st_size} bytes)")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"chosen": chosen, "results": results, "meta": meta}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
