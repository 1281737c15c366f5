"""Streamed pieces join to exactly the full decode, and never end mid-character."""

import random

from ssjf.detokenizer import REPLACEMENT, IncrementalDetokenizer

TEXTS = ["Hello, world! 你好，世界。 Ça va? 🙂🚀 naïve café — done.", "日本語のテキスト 🎉 emoji 👍🏽 and ascii", "plain"]


def stream(tokenizer, ids):
    d = IncrementalDetokenizer(tokenizer)
    pieces = [d.add(t) for t in ids]
    pieces.append(d.flush())
    return pieces


def test_pieces_join_to_full_decode_for_multibyte_text(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces = stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
        assert not any(p.endswith(REPLACEMENT) for p in pieces)


def test_random_token_sequences_join_to_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, ids)) == "hi"
