"""The decode-attention kernel against torch: the same cache writes, the same attention as SDPA
over each row's own span, for either cache dtype, the head sizes with their own copy and the
generic one, grouped queries, slots in any order; and the torch runner gives the same greedy
tokens with it as without it."""

import pytest
import torch
import torch.nn.functional as F

from ssjf import kernels
from ssjf.config import EngineConfig
from ssjf.engine import Engine
from ssjf.model_runner import ModelRunner
from ssjf.request import NullSink, Request

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the runner uses torch's attention")


def reference(q, k_new, v_new, k_cache, v_cache, rows, pos, scale):
    """Cache writes by index_put, then SDPA with each row masked to its own span."""
    b, heads, d = k_new.shape
    k_cache[rows, :, pos] = k_new
    v_cache[rows, :, pos] = v_new
    span = int(pos.max()) + 1
    mask = (torch.arange(span)[None] <= pos[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.view(b, heads, -1, d), k_cache[rows, :, :span], v_cache[rows, :, :span],
                                         attn_mask=mask, scale=scale)
    return out.reshape(b, -1)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("group", [1, 3])
def test_decode_attention_matches_sdpa(dtype, atol, head_dim, group):
    gen = torch.Generator().manual_seed(head_dim * 10 + group)
    slots, heads, max_len, b = 6, 2, 300, 5
    k_cache = torch.randn(slots, heads, max_len, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(slots, heads, max_len, head_dim, generator=gen).to(dtype)
    q = torch.randn(b, heads * group, head_dim, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(b, heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    rows = torch.tensor([4, 0, 2, 5, 1])  # not 0..b-1: the retry path's gathered slots
    pos = torch.tensor([0, 299, 17, 128, 64])  # a first token, the cache's last position, odd lengths
    kc, vc = k_cache.clone(), v_cache.clone()
    want = reference(q, k_new, v_new, k_cache, v_cache, rows, pos, head_dim**-0.5)
    got = kernels.decode_attention(q, k_new, v_new, kc, vc, rows, pos, head_dim**-0.5)
    assert got.dtype == dtype and got.shape == (b, heads * group * head_dim)
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)  # the new rows written, nothing else touched
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)


def test_decode_attention_refuses_a_strided_cache():
    cache = torch.zeros(2, 1, 8, 64)[:, :, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        kernels.decode_attention(torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), cache, cache,
                                 torch.tensor([0]), torch.tensor([0]), 0.125)


def test_the_runner_gives_the_same_tokens_with_and_without_the_kernel(tiny_model, tokenizer):
    prompts = ["hello there", "a much longer prompt about the sea and the sky", "x", "What is 2+2?"]
    tokens = {}
    for on in (True, False):
        config = EngineConfig(dtype="float32", max_seq_len=128, max_batch_size=4, decode_kernels=on)
        runner = ModelRunner(config, model=tiny_model, tokenizer=tokenizer)
        assert runner.fast_attention is on
        engine = Engine(config, runner=runner)
        reqs = [Request(f"r{i}", tokenizer(p)["input_ids"], max_tokens=12 + 3 * i, sink=NullSink(), ignore_eos=True)
                for i, p in enumerate(prompts)]
        for r in reqs:
            engine.add_request(r)
        engine.run_until_idle()
        tokens[on] = [r.output_ids for r in reqs]
    assert tokens[True] == tokens[False]
