"""JSON Lines in and out, and the two tokenisation helpers every text-continuation consumer needs.

Bad input must fail as one line naming the file and the line (``books.jsonl:7: ...``), not as a
``KeyError`` deep inside a generation loop, so readers validate fields up front.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fisherdist.errors import FisherdistError


def _lines(path: str | Path) -> Iterable[tuple[int, dict[str, Any]]]:
    p = Path(path)
    if not p.is_file():
        raise FisherdistError(f"{p}: file not found (expected a JSON Lines file)")
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FisherdistError(f"{p}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise FisherdistError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(value, dict):
                raise FisherdistError(f"{p}:{lineno}: expected a JSON object, got {type(value).__name__}")
            yield lineno, value


def check_jsonl(path: str | Path) -> None:
    """Read the whole file once (preflight): every line UTF-8 and a JSON object, or one line naming it."""
    for _ in _lines(path):
        pass


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON Lines file (blank lines skipped); each line must be a JSON object."""
    return [rec for _, rec in _lines(path)]


def read_records(path: str | Path, fields: Sequence[str], allow_empty: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Records that each carry a string for every name in ``fields`` (non-empty unless in ``allow_empty``).

    ``path`` is any data reference (:mod:`fisherdist.data.source`: Parquet, Arrow, CSV, ``save_to_disk``
    directories, dataset ids, ``?split=...``); a plain JSONL file is read here, and the error names the
    file, the line and the field, e.g. ``books.jsonl:3: missing string field 'text'``.
    """
    from fisherdist.data.source import read_any

    return read_any(path, fields, allow_empty)


def read_jsonl_records(path: str | Path, fields: Sequence[str], allow_empty: Sequence[str] = ()) -> list[dict[str, Any]]:
    """:func:`read_records` for a JSON Lines file."""
    records = []
    for lineno, rec in _lines(path):
        for name in fields:
            value = rec.get(name)
            if not isinstance(value, str):
                raise FisherdistError(f"{path}:{lineno}: missing string field {name!r} (got {type(value).__name__})")
            if not value and name not in allow_empty:
                raise FisherdistError(f"{path}:{lineno}: field {name!r} is empty")
        records.append(rec)
    if not records:
        raise FisherdistError(f"{path}: no records")
    return records


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows atomically (temp file + rename) so a crashed run never leaves half a file behind."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(p)
    return p


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (windows are cut from these)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text (e.g. ``[BOS]``; often ``[]``), found by comparison
    rather than by tokenizer-specific flags, so prompts built from raw ids match what the model saw."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = encode(tokenizer, "a")
    for cut in range(len(with_special) - len(plain) + 1):
        if with_special[cut : cut + len(plain)] == plain:
            return with_special[:cut]
    return []


def split_encode(tokenizer: Any, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """Ids of ``prompt`` and of ``continuation`` *as it follows the prompt*: the tail of
    ``encode(prompt + continuation)`` when that starts with ``encode(prompt)``, else ``encode(continuation)``."""
    p_ids = encode(tokenizer, prompt)
    joint = encode(tokenizer, prompt + continuation)
    if joint[: len(p_ids)] == p_ids:
        return p_ids, joint[len(p_ids) :]
    return p_ids, encode(tokenizer, continuation)


def split_decode(tokenizer: Any, prefix: Sequence[int], continuation: Sequence[int]) -> tuple[str, str]:
    """Texts of ``prefix`` and ``continuation`` such that ``prompt + continuation_text`` is the decoded
    whole window (tokenizers that strip a leading space when decoding a piece alone would lose it)."""
    prompt = tokenizer.decode(list(prefix), skip_special_tokens=True)
    whole = tokenizer.decode(list(prefix) + list(continuation), skip_special_tokens=True)
    if whole.startswith(prompt):
        return prompt, whole[len(prompt) :]
    return prompt, tokenizer.decode(list(continuation), skip_special_tokens=True)
