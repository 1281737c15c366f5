"""The proxy's sentence encoder: a packaged BERT-family model (MiniLM) or the served LLM's own
layers, mean-pooled (or last-token) and L2-normalised. A fine-tuned encoder travels in its
artifact as low-rank adapters, merged into the packaged weights at load, so serving costs the
same as the frozen encoder (training them: ssjf_tools.train_proxy)."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..assets import resolve_encoder
from ..cpus import resolve_dtype
from ..kernels.linear import linear as cpu_linear

ADAPTER = "adapter."


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
            stack = self.layer_stack()
            if layers > len(stack):
                raise ValueError(f"{name} has {len(stack)} layers; asked for {layers}")
            del stack[layers:]
        self.lean = FastBert.supports(self.model)  # off while adapters train unmerged
        if self.int8 and not self.lean:
            raise ValueError(f"int8 needs a BERT-family encoder; {name} is not one")
        # tokens the chat template adds around a prompt (last pooling counts only the prompt's own)
        self._template_len = len(self._chat_ids("")) if pooling == "last" else 0

    def layer_stack(self) -> torch.nn.ModuleList:
        for path in ("encoder.layer", "layers", "transformer.layer", "layer"):
            obj = self.model
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.nn.ModuleList):
                return obj
        raise ValueError(f"cannot find the layer stack of {type(self.model).__name__} to truncate")

    @torch.no_grad()
    def load_adapters(self, arrays: dict[str, np.ndarray], tag: str = "") -> None:
        """Merge trained adapters into the weights: W += b @ a for linear layers, norms replaced.
        `tag` names them in the embedding cache key, so cached embeddings never mix encoders."""
        stack = self.layer_stack()
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


def encoder_dtype(name: str, device: str, enc: dict) -> str:
    """The proxy encoder's dtype. "auto": bf16 where the hardware computes it natively (and on
    CUDA); on other CPUs int8 matrix products for BERT-family encoders (MiniLM), else fp32."""
    if name != "auto":
        return name
    chosen = str(resolve_dtype("auto", device)).removeprefix("torch.")
    if chosen == "float32" and torch.device(device).type == "cpu" and enc.get("name", "minilm") == "minilm":
        return "int8"
    return chosen
