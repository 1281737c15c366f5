"""The train/test split every tool shares: deterministic, by conversation or by prompt text, and
recorded in an artifact's metadata so that any later tool redoes it on any file."""

from __future__ import annotations

import hashlib

from .data import conversation


def in_test_split(key: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic split by a key (a prompt's text, or its conversation): the same key always
    lands on the same side."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def shared_prompts(rows) -> set[str]:
    """Prompts that occur in more than one conversation, or both in one and outside any
    ("continue", "Explain quantum computing in simple terms"): these split by their text."""
    homes: dict[str, set[str]] = {}
    for r in rows:
        homes.setdefault(r.prompt, set()).add(conversation(r.id))
    return {p for p, h in homes.items() if len(h) > 1}


def split_key(row, shared_digests: set[str]) -> str:
    """What decides a row's side. Turns of one conversation share a topic and often near-copies
    of one another's prompts ("provide content for Section 5", "... Section 8"), so a
    conversation goes to one side whole; a prompt outside any conversation, or one that recurs
    across conversations, goes by its text. Either way the same prompt never sits on two sides."""
    conv = conversation(row.id)
    if conv and prompt_digest(row.prompt) not in shared_digests:
        return f"conversation:{conv}"
    return row.prompt


def split_meta(rows) -> dict:
    """The split's record in an artifact's metadata, enough for `held_out` to redo it on any file."""
    return {"by": "conversation", "shared_prompts": sorted(prompt_digest(p) for p in shared_prompts(rows))}


def held_out(row, meta: dict) -> bool:
    """Whether a row fell in an artifact's test split (the split its metadata records).
    Artifacts trained before conversation splits record none and split by prompt."""
    split = meta.get("split") or {}
    key = split_key(row, set(split["shared_prompts"])) if split.get("by") == "conversation" else row.prompt
    return in_test_split(key, meta.get("test_fraction", 0.2), meta.get("split_seed", 0))
