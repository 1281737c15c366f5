"""Model runner (the `torch` runner): owns the weights, the KV cache, its slots, and the two
phases, prefill and decode.

The KV cache is one static tensor per K and V, shaped
[layers, slots, kv_heads, max_seq_len, head_dim]. Running requests occupy slots
0..B-1 with no holes (release() moves the last request into a freed slot), so a
decode step reads the cache through a plain slice and never recomputes a prefix.
Under a preemptive policy `park_slots` more slots follow the batch's: a preempted
request's cache is copied there and copied back when it is admitted again, so it
resumes without a prefill (when they are all taken it is prefilled again).
The forward pass drives the Hugging Face modules of a Llama-family model
(Llama, SmolLM, Mistral, Qwen2/3) directly, layer by layer.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ... import kernels
from ...config import PREEMPTIVE, EngineConfig
from ...cpus import EngineThreads, resolve_dtype
from ...kernels.linear import linear as cpu_linear
from ...request import Request
from ..base import StepOutput
from .graphs import GraphedDecode
from .model import RMS_NORMS, eos_ids, load_model, prefill_groups, prefill_width

log = logging.getLogger(__name__)


class ModelRunner(GraphedDecode):
    def __init__(self, config: EngineConfig, model=None, tokenizer=None):
        from ...assets import resolve_llm

        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.threads = EngineThreads(config.num_threads, config.device)  # bound at the first step
        if model is None:
            model, tokenizer = load_model(resolve_llm(config.model), self.device, self.dtype)
        self.model, self.tokenizer = model, tokenizer
        self.dtype = next(model.parameters()).dtype
        core = model.model
        self.embed, self.layers, self.norm, self.lm_head = core.embed_tokens, core.layers, core.norm, model.lm_head
        attn = self.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                raise ValueError(f"{type(model).__name__} is not a Llama-family model (no self_attn.{name})")
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.group = self.num_heads // self.num_kv_heads
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.max_seq_len = min(config.max_seq_len, getattr(cfg, "max_position_embeddings", config.max_seq_len))
        self.num_slots = config.max_batch_size
        self.slots: list[Request] = []  # the running requests: slots[i]'s cache is row i
        self.cached: dict[Request, int] = {}  # a running request's tokens whose K/V are in its row
        preemptive = config.policy in PREEMPTIVE and config.batching == "continuous"
        self.park_slots = list(range(self.num_slots, self.num_slots + (config.park_slots if preemptive else 0)))
        self.parked: dict[int, tuple[int, int]] = {}  # a preempted request's seq -> (park slot, cached tokens)
        self._generators: dict[int, torch.Generator] = {}  # a seeded request's seq -> its own random stream
        shape = (len(self.layers), self.num_slots + len(self.park_slots), self.num_kv_heads, self.max_seq_len,
                 self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        positions = torch.arange(self.max_seq_len, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = core.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_seq_len, head_dim]
        self.eos_token_ids = eos_ids(getattr(model, "generation_config", None), tokenizer)
        self.fused = [self._fuse(layer) for layer in self.layers]
        self.head = self._linear(self.lm_head.weight, getattr(self.lm_head, "bias", None))
        self.fast_attention = config.decode_kernels and kernels.supports(self.k_cache)
        self.fast_pointwise = self.fast_attention and self._llama_pointwise()
        self.rope = (self.cos.float().contiguous(), self.sin.float().contiguous())  # the kernel's tables
        # CUDA graphs of the decode step, one per batch-size bucket (captured at first use)
        self.static_decode = config.cuda_graphs and self.device.type == "cuda"
        self.positions = torch.arange(self.max_seq_len, device=self.device)
        self.slot_ids = torch.arange(self.num_slots, device=self.device)
        self._graphs: dict[int, tuple] = {}
        self._graph_pool = None
        log.info(
            "model runner: %s on %s in %s, %d slots (+%d to park) x %d tokens of KV cache (%.0f MiB)",
            type(model).__name__, self.device, self.dtype, self.num_slots, len(self.park_slots), self.max_seq_len,
            2 * self.k_cache.numel() * self.k_cache.element_size() / 2**20,
        )

    def _llama_pointwise(self) -> bool:
        """The norms are Llama's RMSNorm and the MLP is SiLU(gate) * up, at widths the kernels take:
        then kernels.add_rmsnorm and kernels.silu_mul stand in for them in the decode step."""
        norms = [self.norm] + [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        rms = all(type(n).__name__ in RMS_NORMS and hasattr(n, "variance_epsilon") and n.weight.dtype == self.dtype
                  for n in norms)
        silu = all("gate_up" in f and type(layer.mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
                   for f, layer in zip(self.fused, self.layers))
        hidden, inner = self.norm.weight.shape[0], self.layers[0].mlp.down_proj.in_features
        return rms and silu and hidden % kernels.LANES == 0 and inner % (2 * kernels.LANES) == 0

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @staticmethod
    def _fuse_linears(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One weight for several projections of the same input; the modules keep views into it."""
        weight = torch.cat([m.weight.data for m in linears])
        bias = None
        if any(m.bias is not None for m in linears):
            bias = torch.cat([m.bias.data if m.bias is not None else weight.new_zeros(m.out_features) for m in linears])
        start = 0
        for m in linears:
            m.weight.data = weight[start : start + m.out_features]
            if m.bias is not None:
                m.bias.data = bias[start : start + m.out_features]
            start += m.out_features
        return weight, bias

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return cpu_linear(weight, bias, rows=self.num_slots)  # packed once in bf16 on a CPU

    def _fuse(self, layer) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        fused = {"qkv": self._linear(*self._fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])),
                 "o": self._linear(attn.o_proj.weight, attn.o_proj.bias)}
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            fused["gate_up"] = self._linear(*self._fuse_linears([mlp.gate_proj, mlp.up_proj]))
            fused["down"] = self._linear(mlp.down_proj.weight, mlp.down_proj.bias)
        return fused

    def _mlp(self, i: int, layer, h, pointwise: bool = False):
        gate_up = self.fused[i].get("gate_up")
        if gate_up is None:
            return layer.mlp(h)
        if pointwise:  # SiLU(gate) * up in one pass of the kernel
            return self.fused[i]["down"](kernels.silu_mul(gate_up(h)))
        gate, up = gate_up(h).chunk(2, dim=-1)
        return self.fused[i]["down"](layer.mlp.act_fn(gate) * up)

    def _qkv(self, i: int, attn, h, batch: int, seq: int, cos, sin):
        """q, k, v as [batch, heads, seq, head_dim], q and k rotated by (cos, sin)."""
        qkv = self.fused[i]["qkv"](h)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    # ---- the forward pass: one layer loop, the attention chosen once per call -------------
    def _forward(self, x, attend, pointwise: bool = False) -> torch.Tensor:
        """The layers over hidden states x ([n, width, H] in prefill, [B, H] in decode):
        norm -> attend (projections, rotary, cache write, attention) -> o-proj -> add -> norm -> MLP
        -> add. attend(i, self_attn, h) is the call's attention variant. With pointwise (the CPU
        kernels, Llama's norms) each add is fused into the norm after it. Returns the final norm's
        output for every position."""
        out = torch.empty_like(x) if pointwise else None  # the kernel's normed rows, reused
        h = self._add_norm(x, None, self.layers[0].input_layernorm, out)
        for i, layer in enumerate(self.layers):
            h = self._add_norm(x, self.fused[i]["o"](attend(i, layer.self_attn, h)), layer.post_attention_layernorm, out)
            after = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h = self._add_norm(x, self._mlp(i, layer, h, pointwise), after, out)
        return h

    @staticmethod
    def _add_norm(x, delta, norm, out):
        """x += delta (in place), then norm(x): by the kernel into `out` where there is one."""
        if out is not None:
            return kernels.add_rmsnorm(x, delta, norm.weight, norm.variance_epsilon, out)
        if delta is not None:
            x.add_(delta)
        return norm(x)

    def _attend_causal(self, rows, width: int):
        """Prefill's attention: every position of each prompt written to its slot, causal SDPA."""
        cos, sin = self.cos[:width][None, None], self.sin[:width][None, None]

        def attend(i, attn, h):
            n = h.shape[0]
            q, k, v = self._qkv(i, attn, h, n, width, cos, sin)
            self.k_cache[i, rows, :, :width] = k
            self.v_cache[i, rows, :, :width] = v
            # Right padding: with a causal mask, a real query only sees real keys.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
            return out.transpose(1, 2).reshape(n, width, -1)

        return attend

    def _attend_span(self, rows, pos, span: int, compact: bool = True):
        """Decode's attention in torch, over each row's first `span` cached positions, masked past
        its own: the eager step (span = the batch's live span) and the graph-captured one (span =
        the whole cache, so that no shape depends on the step). Compact rows (0..B-1) read the
        cache through a view; others gather theirs."""
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]
        mask = (self.positions[:span][None] <= pos[:, None])[:, None, None, :]

        def attend(i, attn, h):
            b = h.shape[0]
            q, k, v = self._qkv(i, attn, h, b, 1, cos, sin)
            self.k_cache[i][rows, :, pos] = k[:, :, 0]
            self.v_cache[i][rows, :, pos] = v[:, :, 0]
            if compact:
                keys, values = self.k_cache[i, :b, :, :span], self.v_cache[i, :b, :, :span]
            else:
                keys, values = self.k_cache[i, rows, :, :span], self.v_cache[i, rows, :, :span]
            # One query per sequence: fold the query heads of a KV group into the "length" axis.
            out = F.scaled_dot_product_attention(
                q.view(b, self.num_kv_heads, self.group, self.head_dim), keys, values, attn_mask=mask, scale=self.scaling
            )
            return out.reshape(b, -1)

        return attend

    def _attend_kernel(self, rows, pos):
        """Decode's attention in the CPU kernel (kernels.decode_attention): rotary, cache write and
        attention over each row's span in one call per layer. Qwen3's per-head norms come before the
        rotary, so there the projections and the rotary run in torch and the kernel only attends."""
        qk_norm = hasattr(self.layers[0].self_attn, "q_norm")
        cos, sin = (self.cos[pos][:, None, None], self.sin[pos][:, None, None]) if qk_norm else (None, None)

        def attend(i, attn, h):
            if qk_norm:
                b = h.shape[0]
                q, k, v = self._qkv(i, attn, h, b, 1, cos, sin)
                qkv, rope = torch.cat([t.reshape(b, -1) for t in (q, k, v)], dim=-1), None
            else:
                qkv, rope = self.fused[i]["qkv"](h), self.rope
            return kernels.decode_attention(qkv, self.num_heads, self.k_cache[i], self.v_cache[i], rows, pos,
                                            self.scaling, rope)

        return attend

    @torch.inference_mode()
    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run prompts into their cache slots and return the last position's logits [n, vocab].
        Prompts of very different lengths run in separate groups (prefill_groups): one batch would
        pad a 50-token prompt to a 500-token one's width, and the matrix products cost per row."""
        groups = prefill_groups([len(p) for p in prompts], self.max_seq_len)
        if len(groups) == 1:
            return self._prefill(slots, prompts)
        logits = [None] * len(prompts)
        for group in groups:
            for i, row in zip(group, self._prefill([slots[i] for i in group], [prompts[i] for i in group])):
                logits[i] = row
        return torch.stack(logits)

    def _prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        n = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        width = prefill_width(int(lens.max()), self.max_seq_len)
        ids = torch.zeros(n, width, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        h = self._forward(self.embed(ids), self._attend_causal(torch.tensor(slots, device=self.device), width))
        return self.head(h[torch.arange(n, device=self.device), lens - 1]).float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], slots: list[int] | None = None) -> torch.Tensor:
        """One token for each request in `slots` (default 0..B-1) at its position; returns logits [B, vocab].
        The engine keeps running requests in slots 0..B-1, so attention reads the cache through a
        view; other slot lists (a failed batch retried one request at a time) gather their rows.
        The attention is chosen here, once: the captured graph (cuda_graphs), the CPU kernel
        (decode_kernels; with Llama's norms the pointwise kernels too), or torch's."""
        b = len(tokens)
        compact = slots is None or list(slots) == list(range(b))
        if compact and self.static_decode:
            return self._replay(tokens, positions)
        tok = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        rows = torch.arange(b, device=self.device) if compact else torch.tensor(slots, device=self.device)
        if self.fast_attention:
            attend, pointwise = self._attend_kernel(rows, pos), self.fast_pointwise
        else:
            attend, pointwise = self._attend_span(rows, pos, int(max(positions)) + 1, compact), False
        return self.head(self._forward(self.embed(tok), attend, pointwise)).float()

    # ---- the runner interface (runners.base.Runner) --------------------------------------
    def slot_of(self, req: Request) -> int:
        """req's KV-cache row while it runs; -1 when it holds none."""
        return self._rows().get(req, -1)

    def _rows(self) -> dict[Request, int]:
        return {r: row for row, r in enumerate(self.slots)}

    def admit(self, reqs: list[Request]) -> StepOutput:
        """Give each request the next free slot and prefill it: its first token. One whose cache was
        parked at its preemption gets it back instead (no prefill; its next token comes from step)."""
        self.threads.bind("torch runner")
        if len(self.slots) + len(reqs) > self.num_slots:
            raise RuntimeError(f"no free KV-cache slot ({len(self.slots)} of {self.num_slots} in use)")
        fresh = []
        for req in reqs:
            parked = self.parked.pop(req.seq, None)
            if parked is None:
                fresh.append(req)
            else:
                self.move_slot(parked[0], len(self.slots), parked[1])
                self.cached[req] = parked[1]
            self.slots.append(req)
        row = self._rows()
        out = self._run(fresh, lambda rs: self.prefill([row[r] for r in rs], [r.context_ids for r in rs])) \
            if fresh else StepOutput()
        for req, _ in out.tokens:
            self.cached[req] = req.context_len  # the new token is appended after this
        out.resumed = [r for r in reqs if r not in fresh]
        return out

    def step(self, reqs: list[Request]) -> StepOutput:
        """Decode one token for each request, in slot order (the cache is then read through a view)."""
        self.threads.bind("torch runner")
        row = self._rows()
        out = self._run(sorted(reqs, key=row.__getitem__),
                        lambda rs: self.decode([r.output_ids[-1] for r in rs], [self.cached[r] for r in rs],
                                               [row[r] for r in rs]))
        for req, _ in out.tokens:
            self.cached[req] += 1
        return out

    def preempt(self, req: Request) -> None:
        """Copy req's cache to a free park slot (if one is) and give its batch slot back."""
        taken = {row for row, _ in self.parked.values()}
        free = [s for s in self.park_slots if s not in taken]
        if free and req in self.cached:
            self.move_slot(self.slot_of(req), free[0], self.cached[req])
            self.parked[req.seq] = (free[0], self.cached[req])
        self._vacate(req)

    def release(self, req: Request) -> None:
        self.parked.pop(req.seq, None)
        self._generators.pop(req.seq, None)
        self._vacate(req)

    def _vacate(self, req: Request) -> None:
        """Free req's batch slot; the last request moves into the hole, so slots stay 0..B-1."""
        hole = self.slot_of(req)
        if hole < 0:
            return
        self.cached.pop(req, None)
        last = self.slots.pop()
        if last is not req:
            self.slots[hole] = last
            self.move_slot(len(self.slots), hole, self.cached.get(last, 0))

    def _run(self, reqs: list[Request], forward) -> StepOutput:
        """forward(reqs) -> logits, then sample. If the batch fails, each request is retried alone:
        the ones that fail alone are reported failed, the rest go on."""
        try:
            tokens = self.sample(forward(reqs), reqs)
            return StepOutput(tokens=[(r, [t]) for r, t in zip(reqs, tokens)])
        except Exception as exc:
            if len(reqs) == 1:
                return StepOutput(failed=[(reqs[0], exc)])
            log.warning("a batch of %d failed (%s); retrying each request alone", len(reqs), exc)
        out = StepOutput()
        for req in reqs:
            try:
                out.tokens.append((req, self.sample(forward([req]), [req])))
            except Exception as exc:
                out.failed.append((req, exc))
        return out

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a request's cached K/V from slot src to slot dst."""
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """Greedy where temperature is (about) 0; else a draw from softmax(logits / T) restricted to
        the top_k most likely tokens and to the nucleus whose probability reaches top_p. A request
        with a seed draws from a generator of its own, so its tokens repeat whatever it is batched with."""
        tokens = logits.max(dim=-1).indices  # the first maximum, as argmax; on CPU 2-3x faster than argmax
        for i in [i for i, r in enumerate(reqs) if not r.sampling.greedy]:  # a greedy batch stops here
            params, req = reqs[i].sampling, reqs[i]
            row = logits[i].float() / params.temperature
            if 0 < params.top_k < row.numel():
                row = row.masked_fill(row < torch.topk(row, params.top_k).values[-1], float("-inf"))
            probs = torch.softmax(row, dim=-1)
            if params.top_p < 1.0:
                ordered, order = torch.sort(probs, descending=True)
                outside = torch.cumsum(ordered, 0) - ordered >= params.top_p  # the nucleus keeps its first token
                probs = probs.index_fill(0, order[outside], 0.0)
            tokens[i] = torch.multinomial(probs, 1, generator=self._generator(req))[0]
        return tokens.tolist()

    def _generator(self, req: Request) -> torch.Generator | None:
        if req.sampling.seed is None:
            return None
        gen = self._generators.get(req.seq)
        if gen is None:
            gen = self._generators[req.seq] = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        return gen
