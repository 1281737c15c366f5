"""The proxy model: a sentence encoder and a small head that predicts output length.

Features = [mean-pooled, L2-normalised encoder embedding, log(1 + prompt tokens),
one-hot of the answering model (when the artifact conditions on it)]. The head is a
small MLP run in numpy. Whatever the training objective (regression on log length,
classification over length buckets, pairwise ranking), the head ends in one number per
prompt, a predicted log length, so serving is the same for all of them.

An artifact is one .npz file: the head's arrays plus `meta`, a JSON string naming the
encoder (and how many of its layers), the tokenizer lengths were counted with, the
target model, the data and the test metrics. A fine-tuned encoder travels as low-rank
adapters (`adapter.<module>.a`/`.b` for each linear layer, `adapter.<module>.weight`/`.bias`
for each LayerNorm): 1.6 MB at rank 32 for MiniLM-3, merged into the packaged encoder's weights at load,
so serving costs the same as the frozen encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .assets import resolve_encoder
from .config import cache_dir
from .cpus import linear as cpu_linear
from .cpus import resolve_dtype

PACKAGED_ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # shipped with the package, read-only
DEFAULT_ARTIFACT = "smollm2"
ADAPTER = "adapter."


class LoRALinear(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank update b @ a (b starts at zero)."""

    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T) @ self.b.T


def read_meta(artifact: str) -> dict:
    """An artifact's metadata (encoder, data, split, metrics) without loading its encoder."""
    with np.load(resolve_artifact(artifact), allow_pickle=False) as data:
        return json.loads(str(data["meta"]))


def resolve_artifact(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".npz" and path.exists():
        return path
    for folder in (user_artifacts(), PACKAGED_ARTIFACTS):  # a user's artifact shadows a packaged one
        candidate = folder / f"{name}.npz"
        if candidate.exists():
            return candidate
    known = ", ".join(sorted({p.stem for d in (user_artifacts(), PACKAGED_ARTIFACTS) for p in d.glob("*.npz")}))
    raise FileNotFoundError(f"no proxy artifact {name!r} (known: {known}; or pass a .npz path)")


def user_artifacts() -> Path:
    """Where `ssjf train-proxy --name NAME` saves NAME.npz: the cache directory, never the package."""
    return cache_dir() / "artifacts"


class FastBert:
    """An inference-only forward pass for BERT-family encoders (MiniLM is one): the same math as
    transformers' BertModel in eval mode, with query/key/value fused into one matrix product and
    no module wrappers (at batch 1 on a CPU per-operation overhead is a large share of the time).
    Every matrix product is cpus.linear's: packed once in bf16 on a CPU, or int8 with `int8`."""

    def __init__(self, model: torch.nn.Module, int8: bool = False):
        def linear(w, b):
            return cpu_linear(w, b, int8=int8)

        emb = model.embeddings
        self.word, self.pos = emb.word_embeddings.weight, emb.position_embeddings.weight
        self.token_type = emb.token_type_embeddings.weight[0]
        self.norm = (emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps)
        self.layers = []
        for layer in model.encoder.layer:
            att, out = layer.attention, layer.output
            qkv = (att.self.query, att.self.key, att.self.value)
            self.layers.append((
                linear(torch.cat([m.weight for m in qkv]), torch.cat([m.bias for m in qkv])),
                att.self.num_attention_heads, linear(att.output.dense.weight, att.output.dense.bias),
                (att.output.LayerNorm.weight, att.output.LayerNorm.bias, att.output.LayerNorm.eps),
                linear(layer.intermediate.dense.weight, layer.intermediate.dense.bias),
                linear(out.dense.weight, out.dense.bias),
                (out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps),
            ))

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        c = model.config
        return (c.model_type == "bert" and c.hidden_act == "gelu" and getattr(model, "embeddings", None) is not None
                and getattr(c, "position_embedding_type", "absolute") == "absolute")

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        F = torch.nn.functional
        b, t = input_ids.shape
        h = self.word[input_ids] + self.pos[:t] + self.token_type
        d = h.shape[-1]
        h = F.layer_norm(h, (d,), *self.norm)
        attn_mask = None if bool(mask.all()) else mask[:, None, None, :].bool()
        for qkv, heads, out, norm1, up, down, norm2 in self.layers:
            q, k, v = qkv(h).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, t, d)
            h = F.layer_norm(out(a) + h, (d,), *norm1)
            h = F.layer_norm(down(F.gelu(up(h))) + h, (d,), *norm2)
        return h


class Encoder:
    """L2-normalised prompt embeddings from any HF model (optionally its first k layers).

    pooling="mean": the mean over the prompt's tokens (sentence encoders such as MiniLM).
    pooling="last": the state at the last token of the prompt wrapped in the model's chat
    template, i.e. where the answer starts. This is for decoder LLMs, above all the served one
    (`smollm2`), whose own states there say most about how long it will answer."""

    def __init__(self, name: str = "minilm", device: str = "cpu", max_length: int = 256, layers: int = 0,
                 dtype: str = "float32", pooling: str = "mean"):
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', not {pooling!r}")
        self.name, self.max_length, self.layers, self.dtype_name = name, max_length, layers, dtype
        self.pooling = pooling
        self.adapted = ""  # the merged adapters' tag (load_adapters)
        self._fast: FastBert | None = None
        path = resolve_encoder(name)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.int8 = dtype == "int8"  # fp32 weights, int8 matrix products in the lean path (CPU)
        if self.int8 and self.device.type != "cpu":
            raise ValueError("int8 encoders run on the CPU only")
        load = torch.float32 if self.int8 else getattr(torch, dtype)
        self.model = AutoModel.from_pretrained(path, dtype=load).to(self.device).eval()
        if layers:
            stack = self._layer_stack()
            if layers > len(stack):
                raise ValueError(f"{name} has {len(stack)} layers; asked for {layers}")
            del stack[layers:]
        self.lean = FastBert.supports(self.model)  # off while adapters train unmerged
        if self.int8 and not self.lean:
            raise ValueError(f"int8 needs a BERT-family encoder; {name} is not one")
        # tokens the chat template adds around a prompt (last pooling counts only the prompt's own)
        self._template_len = len(self._chat_ids("")) if pooling == "last" else 0

    def _layer_stack(self) -> torch.nn.ModuleList:
        for path in ("encoder.layer", "layers", "transformer.layer", "layer"):
            obj = self.model
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.nn.ModuleList):
                return obj
        raise ValueError(f"cannot find the layer stack of {type(self.model).__name__} to truncate")

    def add_adapters(self, rank: int) -> list[torch.nn.Parameter]:
        """Freeze the encoder, wrap every linear layer of its layer stack in a LoRALinear and
        unfreeze the stack's LayerNorms; returns the trainable parameters."""
        for p in self.model.parameters():
            p.requires_grad = False
        self._fast, self.lean = None, False
        stack = self._layer_stack()
        for name, module in list(stack.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent_name, _, attr = name.rpartition(".")
                setattr(stack.get_submodule(parent_name), attr, LoRALinear(module, rank))
            elif isinstance(module, torch.nn.LayerNorm):
                for p in module.parameters():
                    p.requires_grad = True
        return [p for p in self.model.parameters() if p.requires_grad]

    def adapter_arrays(self) -> dict[str, np.ndarray]:
        """The trained adapters as artifact arrays (float16 low-rank factors, float32 norms)."""
        out = {}
        for name, module in self._layer_stack().named_modules():
            if isinstance(module, LoRALinear):
                out[f"{ADAPTER}{name}.a"] = module.a.detach().numpy().astype(np.float16)
                out[f"{ADAPTER}{name}.b"] = module.b.detach().numpy().astype(np.float16)
            elif isinstance(module, torch.nn.LayerNorm):
                out[f"{ADAPTER}{name}.weight"] = module.weight.detach().numpy().astype(np.float32)
                out[f"{ADAPTER}{name}.bias"] = module.bias.detach().numpy().astype(np.float32)
        return out

    @torch.no_grad()
    def load_adapters(self, arrays: dict[str, np.ndarray], tag: str = "") -> None:
        """Merge trained adapters into the weights: W += b @ a for linear layers, norms replaced.
        `tag` names them in the embedding cache key, so cached embeddings never mix encoders."""
        stack = self._layer_stack()
        for key, value in arrays.items():
            name, _, part = key[len(ADAPTER):].rpartition(".")
            if part == "b":
                continue
            module = stack.get_submodule(name)
            if part == "a":
                delta = torch.from_numpy(arrays[f"{ADAPTER}{name}.b"]).float() @ torch.from_numpy(value).float()
                module.weight.copy_((module.weight.float() + delta.to(module.weight.device)).to(module.weight.dtype))
            else:
                getattr(module, part).copy_(torch.from_numpy(value).to(module.weight.dtype))
        self._fast, self.adapted = None, tag

    @property
    def key(self) -> str:
        key = f"{self.name}|{self.layers}|{self.max_length}|{self.dtype_name}"
        return key + (f"|{self.pooling}" if self.pooling != "mean" else "") + (f"|{self.adapted}" if self.adapted else "")

    def _token_ids(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids per text, cut to max_length, and each text's own token count (untruncated,
        without special or template tokens). Cutting keeps the head and the end: [SEP] for mean
        pooling, the template's answer prefix for last pooling."""
        if self.pooling == "last":
            ids = [self._chat_ids(t) for t in texts]
            extra, keep = self._template_len, 16
        else:
            ids = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
            extra, keep = self.tokenizer.num_special_tokens_to_add(), 1
        lens = [max(0, len(x) - extra) for x in ids]
        ids = [x if len(x) <= self.max_length else x[: self.max_length - keep] + x[-keep:] for x in ids]
        return ids, lens

    def _chat_ids(self, text: str) -> list[int]:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]

    def _hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not self.lean:
            return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if self._fast is None:  # inference: the lean path, built after any adapters are merged
            self._fast = FastBert(self.model, int8=self.int8)
        return self._fast(input_ids, mask)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Run one prompt of every width up to max_length. The CPU kernels build and cache a plan
        per input shape, and a width's first call costs about twice a later one; a server pays this
        once at load instead of on its first requests.
        Returns the seconds taken."""
        t0 = time.perf_counter()
        token = self.tokenizer.unk_token_id or 0
        for width in range(1, self.max_length + 1):
            ids = torch.full((1, width), token, device=self.device)
            self._hidden(ids, torch.ones_like(ids))
        return time.perf_counter() - t0

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embeddings (with grad when training) and untruncated prompt lengths; one tokenization."""
        ids, counts = self._token_ids(texts)
        lens = torch.tensor(counts, dtype=torch.float32)
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=self.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=self.device)
        hidden = self._hidden(input_ids, mask)
        if self.pooling == "last":  # right padding: each row's last real token
            pooled = hidden[torch.arange(len(ids), device=self.device), mask.sum(1) - 1]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1), lens

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [n, dim] and prompt lengths in encoder tokens [n]."""
        embs, lens = [], []
        order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            e, n = self.forward([texts[j] for j in idx])
            embs.append(e.cpu().numpy())
            lens.append(n.numpy())
        emb, ln = np.concatenate(embs), np.concatenate(lens)
        out_e, out_l = np.empty_like(emb), np.empty_like(ln)
        out_e[order], out_l[order] = emb, ln
        return out_e, out_l

    def encode_cached(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """encode() with an on-disk cache keyed by encoder settings and prompt text."""
        path = cache_dir() / "embeddings" / (hashlib.sha1(self.key.encode()).hexdigest()[:16] + ".npz")
        known: dict[str, tuple[np.ndarray, float]] = {}
        if path.exists():
            with np.load(path) as d:
                known = {h: (e, n) for h, e, n in zip(d["hashes"], d["emb"], d["lens"])}
        hashes = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        missing = sorted({h: t for h, t in zip(hashes, texts) if h not in known}.items())
        if missing:
            emb, lens = self.encode([t for _, t in missing])
            known.update({h: (e, n) for (h, _), e, n in zip(missing, emb, lens)})
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, hashes=np.array(list(known)), emb=np.stack([v[0] for v in known.values()]),
                     lens=np.array([v[1] for v in known.values()], dtype=np.float32))
            tmp.rename(path)
        return np.stack([known[h][0] for h in hashes]), np.array([known[h][1] for h in hashes], dtype=np.float32)


def features(emb: np.ndarray, prompt_lens: np.ndarray, model_ids: np.ndarray | None = None,
             num_models: int = 0) -> np.ndarray:
    parts = [emb, np.log1p(prompt_lens)[:, None]]
    if num_models:
        onehot = np.zeros((len(emb), num_models), dtype=np.float32)
        onehot[np.arange(len(emb)), model_ids] = 1.0
        parts.append(onehot)
    return np.hstack(parts).astype(np.float32)


class Head:
    """An MLP (numpy inference) mapping standardised features to a predicted log length."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.mean, self.std = arrays["mean"], arrays["std"]
        self.weights = [(arrays[f"w{i}"], arrays[f"b{i}"]) for i in range(int(arrays["num_layers"]))]
        self.centers = arrays.get("centers")  # classification: log length of each bucket
        self.calib = arrays.get("calib")  # ranking: log length = a * score + b

    def predict_log(self, x: np.ndarray) -> np.ndarray:
        h = (x - self.mean) / self.std
        for i, (w, b) in enumerate(self.weights):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        if self.centers is not None:
            p = np.exp(h - h.max(1, keepdims=True))
            return (p / p.sum(1, keepdims=True)) @ self.centers
        h = h[:, 0]
        if self.calib is not None:
            h = self.calib[0] * h + self.calib[1]
        return h


def encoder_dtype(name: str, device: str, enc: dict) -> str:
    """The proxy encoder's dtype. "auto": bf16 where the hardware computes it natively (and on
    CUDA); on other CPUs int8 matrix products for BERT-family encoders (MiniLM), else fp32."""
    if name != "auto":
        return name
    chosen = str(resolve_dtype("auto", device)).removeprefix("torch.")
    if chosen == "float32" and torch.device(device).type == "cpu" and enc.get("name", "minilm") == "minilm":
        return "int8"
    return chosen


class LengthPredictor:
    """prompt -> predicted output length in tokens of the target model's tokenizer."""

    MAX_CHARS = 262144

    def __init__(self, artifact: str = DEFAULT_ARTIFACT, device: str = "cpu", encoder: Encoder | None = None,
                 dtype: str = "auto"):
        """dtype: the encoder's; "auto" picks by the hardware (ssjf.cpus.resolve_dtype), whatever the
        artifact was trained in (the head reads fp32 embeddings either way)."""
        self.path = resolve_artifact(artifact)
        with np.load(self.path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        self.meta = json.loads(str(arrays.pop("meta")))
        adapters = {k: arrays.pop(k) for k in list(arrays) if k.startswith(ADAPTER)}
        self.head = Head(arrays)
        enc = self.meta["encoder"]
        if encoder is None:
            encoder = Encoder(enc["name"], device, enc["max_length"], enc["layers"], encoder_dtype(dtype, device, enc),
                              enc.get("pooling", "mean"))
            if adapters:
                encoder.load_adapters(adapters, self.path.name + ":" + hashlib.sha1(self.path.read_bytes()).hexdigest()[:12])
        self.encoder = encoder
        self.models: list[str] = self.meta.get("models", [])
        self.target_model = self.meta.get("target_model", "")
        self.max_prediction = int(self.meta.get("max_prediction", 8192))

    def _model_ids(self, n: int, models: list[str] | None) -> np.ndarray | None:
        if not self.models:
            return None
        index = {m: i for i, m in enumerate(self.models)}
        default = index.get(self.target_model, 0)
        return np.array([index.get(m, default) for m in (models or [self.target_model] * n)])

    def features(self, texts: list[str], models: list[str] | None = None, cached: bool = False) -> np.ndarray:
        """The head's input for each text (embedding, log prompt length, model one-hot). Texts are
        cut at MAX_CHARS: far past any context, and a huge body must not cost seconds of
        tokenization here before the LLM rejects it."""
        texts = [t[: self.MAX_CHARS] for t in texts]
        emb, lens = (self.encoder.encode_cached if cached else self.encoder.encode)(texts)
        return features(emb, lens, self._model_ids(len(texts), models), len(self.models))

    def predict_log(self, texts: list[str], models: list[str] | None = None, cached: bool = False) -> np.ndarray:
        return self.head.predict_log(self.features(texts, models, cached))

    def to_lengths(self, log_lengths: np.ndarray) -> np.ndarray:
        """Predicted log lengths as token counts (int32, >= 1, at most max_prediction)."""
        return np.clip(np.rint(np.expm1(log_lengths)), 1, self.max_prediction).astype(np.int32)

    def predict(self, texts: list[str], models: list[str] | None = None, cached: bool = False) -> np.ndarray:
        """Predicted lengths (int32, >= 1)."""
        return self.to_lengths(self.predict_log(texts, models, cached))

    @property
    def served_width(self) -> int:
        """Columns of the features predict_served sends: the head's input, then its prediction."""
        return len(self.head.mean) + 1

    def predict_served(self, texts: list[str], correction=None) -> tuple[np.ndarray, np.ndarray]:
        """What the served proxy answers: lengths after the refreshed correction (a
        learner.CorrectionFile, or None), and the features it sends on to the llm (the head's input,
        then the head's own log prediction) so that the llm can learn from the true lengths."""
        x = self.features(texts)
        base = self.head.predict_log(x)
        served = np.hstack([x, base[:, None]]).astype(np.float32)
        log_lengths = base if correction is None else correction.apply(served, base)
        return self.to_lengths(log_lengths), served


def save_artifact(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, meta=np.asarray(json.dumps(meta)), **arrays)
