"""Loaders for prompt/response data: one loader per format, each yielding Row.

Formats (chosen by content, so users point `--data` at their own files):
  - rows:     JSON lines with `prompt` and `response` (or `length`), optional `model`, `id`
              (this project's schema, and what `ssjf profile` writes);
  - ShareGPT: records with `conversations: [{from, value}, ...]` (JSON lines or one JSON array);
              every human turn followed by a gpt turn becomes a row;
  - LMSYS-Chat: records with `conversation: [{role, content}, ...]` and optional `model`;
              every user turn followed by an assistant turn becomes a row;
  - Alpaca:   records with `instruction`, optional `input`, and `output` (or `response`): Stanford
              Alpaca, Code Alpaca, GPTeacher, Alpaca-GPT4 and most instruction sets; the prompt is
              the instruction, then a blank line and the input when there is one;
  - Anthropic HH: records with a `chosen` transcript ("\n\nHuman: ...\n\nAssistant: ..."), as in
              anthropics/hh-rlhf; every Human turn followed by an Assistant turn becomes a row
              (the `rejected` transcript is a second sample of the same model; it is not read);
  - `hf:NAME[:SPLIT]`: a Hugging Face dataset by name (needs `datasets` and network), whose
              records are in any of the formats above.
"""

from __future__ import annotations

import csv
import datetime
import functools
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator


@dataclass
class Row:
    prompt: str
    response: str | None = None
    length: int | None = None  # recorded output length in tokens, when known without text
    model: str = ""  # the model that answered
    id: str = ""


def _records(path: str | Path) -> Iterator[dict]:
    """JSON objects from a JSON-lines file or a file holding one JSON array (gzip too: `.gz`)."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            yield from json.load(f)
            return
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None


def rows_from_record(obj: dict, n: int) -> list[Row]:
    """Rows of one record in any supported format."""
    rid = str(obj.get("id", obj.get("conversation_id", n)))
    if "prompt" in obj:
        return [Row(prompt=obj["prompt"], response=obj.get("response"), length=obj.get("length"),
                    model=obj.get("model", ""), id=rid)]
    if "conversations" in obj:  # ShareGPT
        turns = [(t.get("from", ""), t.get("value", "")) for t in obj["conversations"]]
        return _pairs(turns, {"human", "user"}, {"gpt", "chatgpt", "assistant", "bard", "bing"},
                      obj.get("model", "chatgpt"), rid)
    if "conversation" in obj:  # LMSYS-Chat
        turns = [(t.get("role", ""), t.get("content", "")) for t in obj["conversation"]]
        return _pairs(turns, {"user"}, {"assistant"}, obj.get("model", ""), rid)
    if "instruction" in obj:  # Alpaca
        prompt = "\n\n".join(part for part in (obj["instruction"].strip(), (obj.get("input") or "").strip()) if part)
        return [Row(prompt=prompt, response=obj.get("output", obj.get("response")), model=obj.get("model", ""), id=rid)]
    if "chosen" in obj:  # Anthropic HH
        return _pairs(hh_turns(obj["chosen"]), {"human"}, {"assistant"}, obj.get("model", ""), rid)
    raise ValueError(f"record {n}: no 'prompt', 'conversations' (ShareGPT), 'conversation' (LMSYS-Chat), "
                     "'instruction' (Alpaca) or 'chosen' (Anthropic HH)")


def hh_turns(transcript: str) -> list[tuple[str, str]]:
    """(speaker, text) turns of an Anthropic HH transcript."""
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + transcript.lstrip("\n"))
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def _pairs(turns: list[tuple[str, str]], user: set[str], bot: set[str], model: str, rid: str) -> list[Row]:
    rows = []
    for i in range(len(turns) - 1):
        (who, text), (next_who, answer) = turns[i], turns[i + 1]
        if who.lower() in user and next_who.lower() in bot and text.strip():
            rows.append(Row(prompt=text, response=answer, model=model, id=f"{rid}#{len(rows)}"))
    return rows


def conversation(row_id: str) -> str:
    """The conversation a row comes from, from ids of the form `conversation#turn` (what these
    loaders give ShareGPT and LMSYS-Chat turns, and what `ssjf profile` keeps); "" when none."""
    return row_id.rpartition("#")[0]


def load_records(records: Iterable[dict], models: set[str] | None = None) -> Iterator[Row]:
    for n, obj in enumerate(records, 1):
        for row in rows_from_record(obj, n):
            if not models or row.model in models:
                yield row


def load_rows(spec: str | Path, models: set[str] | None = None) -> Iterator[Row]:
    """Rows from a file (any format above) or `hf:NAME[:SPLIT]`."""
    spec = str(spec)
    if spec.startswith("hf:"):
        _, name, *split = spec.split(":")
        try:
            import datasets
        except ImportError:
            raise RuntimeError("hf: data needs the `datasets` package (pip install datasets)") from None
        yield from load_records(datasets.load_dataset(name, split=split[0] if split else "train"), models)
        return
    yield from load_records(_records(spec), models)


def parse_data_spec(spec: str) -> tuple[str, set[str] | None]:
    """`path[@model,model]`: a file, optionally keeping only rows answered by these models."""
    path, sep, models = spec.rpartition("@") if "@" in spec else (spec, "", "")
    return path, set(models.split(",")) if sep and models else None


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from ssjf.assets import resolve_llm

    return AutoTokenizer.from_pretrained(resolve_llm(name))


def count_tokens(texts: list[str], tokenizer: str = "smollm2") -> list[int]:
    """Token counts of texts under a served model's tokenizer (no special tokens)."""
    return [len(ids) for ids in _tokenizer(tokenizer)(texts, add_special_tokens=False)["input_ids"]] if texts else []


def response_lengths(rows: list[Row], tokenizer: str = "smollm2") -> list[int]:
    """Each row's output length: its recorded `length`, else its response's token count (at least 1)."""
    counted = count_tokens([r.response or "" for r in rows], tokenizer)
    return [r.length if r.length is not None else max(1, n) for r, n in zip(rows, counted)]


def load_arrival_times(path: str) -> list[float]:
    """Request arrival times (epoch seconds, sorted) from an Azure LLM inference trace CSV
    (`TIMESTAMP` column, e.g. 2023-11-16 18:15:46.6805900)."""
    with open(path) as f:
        # the trace has 7 fractional digits; fromisoformat takes at most 6
        return sorted(datetime.datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp() for row in csv.DictReader(f))
