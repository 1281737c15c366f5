"""Loaders for prompt/response data. One loader per format; each yields Row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass
class Row:
    prompt: str
    response: str | None = None
    length: int | None = None  # recorded output length in tokens, when known without text
    model: str = ""  # the model that answered
    id: str = ""


def load_jsonl(path: str | Path, models: set[str] | None = None) -> Iterator[Row]:
    """JSON lines with `prompt` and `response` (or `length`); optional `model`, `id`."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            if "prompt" not in obj:
                raise ValueError(f"{path}:{n}: no 'prompt' field")
            row = Row(prompt=obj["prompt"], response=obj.get("response"), length=obj.get("length"),
                      model=obj.get("model", ""), id=str(obj.get("id", n)))
            if models and row.model not in models:
                continue
            yield row


def load_rows(path: str | Path, models: set[str] | None = None) -> Iterator[Row]:
    """Rows from a file in any supported format (chosen by content)."""
    yield from load_jsonl(path, models)
