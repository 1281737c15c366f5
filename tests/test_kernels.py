"""The decode kernels against torch: the attention kernel's cache writes and attention (SDPA over
each row's own span) for either cache dtype, the head sizes with their own copy and the generic
one, grouped queries (more per KV head than one chunk takes), slots in any order; the fused
residual add + RMSNorm and SiLU(gate) * up against Llama's modules (bit for bit in bf16); and
the torch runner gives the same greedy tokens with them as without them."""

import pytest
import torch
import torch.nn.functional as F

from ssjf import kernels
from ssjf.config import EngineConfig
from ssjf.engine import Engine
from ssjf.runners.torch.runner import ModelRunner
from ssjf.request import NullSink, Request

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the runner uses torch's attention")


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def reference(qkv, q_heads, k_cache, v_cache, rows, pos, scale, rope):
    """Rotary and cache writes by index_put in fp32, then SDPA with each row masked to its own span."""
    b, (slots, heads, max_len, d) = qkv.shape[0], k_cache.shape
    q, k, v = qkv.float().split([q_heads * d, heads * d, heads * d], dim=-1)
    q, k, v = q.view(b, q_heads, d), k.view(b, heads, d), v.view(b, heads, d)
    if rope is not None:
        cos, sin = rope[0][pos][:, None], rope[1][pos][:, None]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.to(v_cache.dtype)
    span = int(pos.max()) + 1
    mask = (torch.arange(span)[None] <= pos[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.view(b, heads, -1, d), k_cache[rows, :, :span].float(),
                                         v_cache[rows, :, :span].float(), attn_mask=mask, scale=scale)
    return out.reshape(b, -1)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim", [64, 128, 40])  # 40: the generic copy
@pytest.mark.parametrize("group", [1, 3, 6])  # 6: a chunk of four query heads, then one of two
@pytest.mark.parametrize("rotary", [True, False])
def test_decode_attention_matches_sdpa(dtype, atol, head_dim, group, rotary):
    gen = torch.Generator().manual_seed(head_dim * 10 + group)
    slots, heads, max_len, b = 6, 2, 300, 5
    k_cache = torch.randn(slots, heads, max_len, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(slots, heads, max_len, head_dim, generator=gen).to(dtype)
    qkv = torch.randn(b, (heads * group + 2 * heads) * head_dim, generator=gen).to(dtype)
    angles = torch.arange(max_len)[:, None] * torch.rand(head_dim // 2, generator=gen).repeat(2)[None]
    rope = (angles.cos(), angles.sin()) if rotary else None
    rows = torch.tensor([4, 0, 2, 5, 1])  # not 0..b-1: the retry path's gathered slots
    pos = torch.tensor([0, 299, 17, 128, 64])  # a first token, the cache's last position, odd lengths
    kc, vc = k_cache.clone(), v_cache.clone()
    want = reference(qkv, heads * group, k_cache, v_cache, rows, pos, head_dim**-0.5, rope)
    got = kernels.decode_attention(qkv, heads * group, kc, vc, rows, pos, head_dim**-0.5, rope)
    assert got.dtype == dtype and got.shape == (b, heads * group * head_dim)
    # the new rows written (fp32 rotary: to the rounding of a fused multiply-add), nothing else touched
    torch.testing.assert_close(kc.float(), k_cache.float(), atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
    assert torch.equal(vc, v_cache)
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)


def test_decode_attention_refuses_a_strided_cache():
    cache = torch.zeros(2, 1, 8, 64)[:, :, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        kernels.decode_attention(torch.zeros(1, 3 * 64), 1, cache, cache, torch.tensor([0]), torch.tensor([0]), 0.125)


def test_decode_attention_refuses_a_projection_of_the_wrong_width_or_dtype():
    cache = torch.zeros(2, 1, 8, 64)
    for qkv in (torch.zeros(1, 2 * 64), torch.zeros(1, 3 * 64, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="qkv"):
            kernels.decode_attention(qkv, 1, cache, cache, torch.tensor([0]), torch.tensor([0]), 0.125)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm_matches_llamas_norm(dtype, with_delta):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(576, eps=1e-5)
    norm.weight.data = torch.randn(576, generator=gen) * 0.3 + 1
    norm = norm.to(dtype)
    x = (torch.randn(7, 576, generator=gen) * 3).to(dtype)
    delta = torch.randn(7, 576, generator=gen).to(dtype) if with_delta else None
    want_x = x + delta if with_delta else x.clone()
    want = norm(want_x)
    got = torch.empty_like(x)
    kernels.add_rmsnorm(x, delta, norm.weight.data, norm.variance_epsilon, got)
    assert torch.equal(x, want_x)  # the residual stream, updated in place
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:  # the sum of squares in another order
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_matches_torch(dtype):
    gen = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(5, 2 * 1536, generator=gen) * 6).to(dtype)
    gate_up[0, :8] = torch.tensor([-200.0, -90.0, -1e-3, 0.0, 1e-3, 90.0, 200.0, -0.0])  # the extremes
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = kernels.silu_mul(gate_up)
    assert got.shape == (5, 1536) and got.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=2e-5)


def test_the_pointwise_kernels_refuse_shapes_and_dtypes_they_do_not_take():
    with pytest.raises(ValueError, match="multiple of"):
        kernels.add_rmsnorm(torch.zeros(2, 12), None, torch.ones(12), 1e-5, torch.zeros(2, 12))
    with pytest.raises(ValueError, match="delta"):
        kernels.add_rmsnorm(torch.zeros(2, 16), torch.zeros(2, 16, dtype=torch.bfloat16), torch.ones(16), 1e-5,
                            torch.zeros(2, 16))
    with pytest.raises(ValueError, match="float16"):
        kernels.silu_mul(torch.zeros(2, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="multiple of"):
        kernels.silu_mul(torch.zeros(2, 24))


needs_amx = pytest.mark.skipif(not kernels.amx(), reason="this CPU has no AMX bf16 tiles")
needs_dpbf = pytest.mark.skipif(not kernels.dpbf(), reason="this CPU has no AVX-512 BF16")
PRODUCTS = [pytest.param(kernels.pack_amx, kernels.amx_linear, marks=needs_amx, id="amx"),
            pytest.param(kernels.pack_dpbf, kernels.dpbf_linear, marks=needs_dpbf, id="dpbf")]


@pytest.mark.parametrize("pack, product", PRODUCTS)
@pytest.mark.parametrize("n, k", [(576, 576), (960, 1536), (80, 64), (48, 32), (16, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_products_match_torch_at_every_row_count(pack, product, n, k, with_bias):
    """Row counts on every path: AMX's one A tile (1..16, 17 overlapping) and 32-row pairs (32, 45,
    128), the dot products' chunks of six (1, 7, 16, 17, 45); column counts leaving 1, 3 or 4 blocks
    in the last group."""
    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16() if with_bias else None
    packed = pack(w)
    assert packed.shape == (n, k)
    for m in (1, 7, 16, 17, 32, 45, 128):
        x = torch.randn(m, k, generator=gen).bfloat16()
        got = product(x, packed, None if bias is None else bias.float())
        exact = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        torch_bf16 = F.linear(x, w, bias).float()
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        # fp32 sums rounded once: within bf16's rounding of the exact product, as torch's own
        assert (got.float() - exact).abs().max() <= 1.5 * (torch_bf16 - exact).abs().max() + 1e-3, m
        assert (got.float() - exact).abs().mean() <= 1.5 * (torch_bf16 - exact).abs().mean() + 1e-4, m
    with pytest.raises(ValueError, match="does not match"):
        product(torch.zeros(2, k + 2, dtype=torch.bfloat16), packed)


@needs_dpbf
@pytest.mark.skipif(kernels.amx(), reason="an AMX CPU takes amx_linear")
def test_cpu_linear_runs_the_dot_products_at_every_row_count():
    from ssjf.kernels.linear import linear

    w, b = (torch.randn(64, 96) * 0.1).bfloat16(), torch.randn(64).bfloat16()
    run = linear(w, b)
    for x in (torch.randn(2, 3, 96).bfloat16(), torch.randn(300, 96).bfloat16(),  # leading dimensions kept
              torch.randn(96, 5).bfloat16().T):  # a strided view
        assert run(x).shape == (*x.shape[:-1], 64)
        torch.testing.assert_close(run(x), F.linear(x, w, b), atol=3e-2, rtol=2e-2)


@needs_amx
def test_cpu_linear_runs_amx_at_decode_rows_and_torch_above():
    from ssjf.kernels.linear import linear

    w = (torch.randn(64, 64) * 0.1).bfloat16()
    run = linear(w, None)
    big = torch.randn(kernels.AMX_ROWS + 1, 64).bfloat16()
    assert torch.equal(run(big), F.linear(big, w))  # above AMX_ROWS: F.linear itself
    x = torch.randn(2, 3, 64).bfloat16()  # leading dimensions kept
    assert run(x).shape == (2, 3, 64)
    torch.testing.assert_close(run(x), F.linear(x, w), atol=2e-2, rtol=2e-2)


def test_pack_amx_refuses_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="N % 16"):
        kernels.pack_amx(torch.zeros(24, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="K % 32"):
        kernels.pack_amx(torch.zeros(16, 48, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="K even"):
        kernels.pack_dpbf(torch.zeros(16, 47, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="N % 16"):
        kernels.pack_dpbf(torch.zeros(24, 64, dtype=torch.bfloat16))


def test_the_runner_gives_the_same_tokens_with_and_without_the_kernel(tiny_model, tokenizer):
    prompts = ["hello there", "a much longer prompt about the sea and the sky", "x", "What is 2+2?"]
    tokens = {}
    for on in (True, False):
        config = EngineConfig(dtype="float32", max_seq_len=128, max_batch_size=4, decode_kernels=on)
        runner = ModelRunner(config, model=tiny_model, tokenizer=tokenizer)
        assert runner.fast_attention is on and runner.fast_pointwise is on
        engine = Engine(config, runner=runner)
        reqs = [Request(f"r{i}", tokenizer(p)["input_ids"], max_tokens=12 + 3 * i, sink=NullSink(), ignore_eos=True)
                for i, p in enumerate(prompts)]
        for r in reqs:
            engine.add_request(r)
        engine.run_until_idle()
        tokens[on] = [r.output_ids for r in reqs]
    assert tokens[True] == tokens[False]


def test_a_qwen3_model_gives_the_same_tokens_with_and_without_the_kernel(tokenizer):
    """Qwen3 normalises q and k per head before the rotary: with the kernel, the projections and the
    rotary run in torch and the kernel only attends."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=512, initializer_range=0.3,
                                         tie_word_embeddings=False)).eval()
    tokens = {}
    for on in (True, False):
        config = EngineConfig(dtype="float32", max_seq_len=128, max_batch_size=4, decode_kernels=on)
        runner = ModelRunner(config, model=model, tokenizer=tokenizer)
        assert runner.fast_attention is on
        engine = Engine(config, runner=runner)
        reqs = [Request(f"r{i}", tokenizer(p)["input_ids"], max_tokens=10, sink=NullSink(), ignore_eos=True)
                for i, p in enumerate(["hello there", "the sea and the sky", "x"])]
        for r in reqs:
            engine.add_request(r)
        engine.run_until_idle()
        tokens[on] = [r.output_ids for r in reqs]
    assert tokens[True] == tokens[False]
