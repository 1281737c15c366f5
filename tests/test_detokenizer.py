"""Streamed pieces join to exactly the full decode, and never end mid-character."""

import random

from ssjf.detokenizer import REPLACEMENT, IncrementalDetokenizer

TEXTS = ["Hello, world! 你好，世界。 Ça va? 🙂🚀 naïve café — done.", "日本語のテキスト 🎉 emoji 👍🏽 and ascii", "plain"]


def stream(tokenizer, ids, stops=()):
    d = IncrementalDetokenizer(tokenizer, stops)
    pieces = []
    for t in ids:
        pieces.append(d.add(t))
        if d.stopped:
            break
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


def test_a_stop_string_ends_the_text_even_across_tokens_and_is_never_released(tokenizer):
    ids = tokenizer.encode("Hello there, world END of it", add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer, ("END", "\n\n"))
    pieces = []
    for t in ids:
        pieces.append(d.add(t))
        assert "E" not in "".join(pieces)  # "E" could begin "END": held back until it is settled
        if d.stopped:
            break
    assert d.stopped and "".join(pieces) + d.flush() == "Hello there, world "
    for cut in range(1, 4):  # the stop string split at every point between two pieces of text
        d = IncrementalDetokenizer(tokenizer, ("END",))
        out = d._scan("abc" + "END"[:cut]) + d._scan("END"[cut:] + " tail")
        assert out == "abc" and d.stopped and d.flush() == ""


def test_what_was_held_back_for_a_stop_string_that_never_came_is_released_at_the_end(tokenizer):
    text = "a stop string almost: EN"
    pieces = stream(tokenizer, tokenizer.encode(text, add_special_tokens=False), ("END",))
    assert "".join(pieces) == text and pieces[-1].endswith("EN")
    assert "".join(stream(tokenizer, tokenizer.encode("我说 END 了", add_special_tokens=False), ("END",))) == "我说 "


def test_a_stop_string_that_the_last_flush_completes_still_keeps_the_text_before_it(tokenizer):
    d = IncrementalDetokenizer(tokenizer, ("END",))
    assert d._scan("ab") == ""  # held: it could begin "END"
    d.ids = tokenizer.encode("cEND tail", add_special_tokens=False)  # tokens not yet released (a partial character)
    assert d.flush() == "abc" and d.stopped
