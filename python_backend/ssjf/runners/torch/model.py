"""The torch runner's model side: loading a Llama-family model and its tokenizer, the tokens that
end a generation, and the shapes prefill runs at (a fixed ladder of padded widths)."""

from __future__ import annotations

import torch


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def eos_ids(generation_config, tokenizer) -> set[int]:
    """The tokens that end a generation: the generation config's and the tokenizer's EOS."""
    ids = set()
    for source in (generation_config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def prefill_width(longest: int, limit: int) -> int:
    """The padded width of a prefill batch: the next rung of a fixed ladder (16, 24, 32, ... 64 in
    steps of 8, then four rungs per doubling: 80, 96, 112, 128, 160, ...). Two dozen shapes
    instead of one per prompt length: on CPU every new prefill width left memory behind
    (allocator and kernel caches), and resident memory crept up without bound under a real
    prompt mix; with the ladder it levels off. Short prompts pad by at most 7 tokens, longer ones
    by at most a quarter (right padding under a causal mask, so results are unchanged)."""
    width = 16
    while width < longest:
        width = width + 8 if width < 64 else width + (1 << (width.bit_length() - 3))
    return min(width, limit) if longest <= limit else longest


def prefill_groups(lengths: list[int], limit: int, waste: float = 1.25, slack: int = 64) -> list[list[int]]:
    """Indices of prompts to prefill together: longest first, a group takes the next prompt while
    its padded rows (count x width) stay within `waste` x its real tokens + `slack` (short prompts
    batch: below a few dozen rows a call's fixed cost outweighs the padding)."""
    groups: list[list[int]] = []
    width = real = 0  # the open group's padded width and real tokens
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and (len(groups[-1]) + 1) * width <= waste * (real + lengths[i]) + slack:
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            width, real = prefill_width(lengths[i], limit), lengths[i]
    return groups


RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # one formula: w * rmsnorm(x)
