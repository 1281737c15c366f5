"""Incremental, UTF-8 safe detokenization.

Byte-level tokenizers split multi-byte characters across tokens. Each call decodes
a short window of recent tokens and releases only text that no longer ends in a
partial character (U+FFFD), so streamed pieces always join to the full decode.

Stop strings end the text where the first of them begins (it is not part of the output). Text
that could still be the start of one is held back until the next token settles it, so a stream
never shows a piece it has to take back.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stops: tuple[str, ...] | list[str] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this have been released as text
        self.stops = tuple(stops)
        self.keep = max(map(len, self.stops), default=1) - 1  # characters that could begin a stop string
        self.held = ""  # decoded text that may be the start of a stop string
        self.stopped = False  # a stop string was found: the text ended before it

    def _scan(self, text: str) -> str:
        """What of text may be released: all of it without stop strings; else up to the first stop
        string (then `stopped`), keeping back a tail that could begin one."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held, self.stopped = self.held[:cut], "", True
            return out
        out = self.held[: max(0, len(self.held) - self.keep)]
        self.held = self.held[len(out):]
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token and return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return self._scan(text[len(prefix) :])
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of output (a trailing partial character, the
        start of a stop string that never came), unless a stop string ended the text."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        out = self._scan(text[len(prefix) :])  # a stop string may still turn up here
        out, self.held = out + self.held, ""
        return out
