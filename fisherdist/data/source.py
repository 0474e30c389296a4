"""Data references: a JSONL file, or anything Hugging Face ``datasets`` reads, behind one record reader.

A reference is ``SOURCE[?key=value&...]``. ``SOURCE`` is a ``.jsonl`` file (read by :mod:`.jsonl`, with its
line-numbered errors), a ``.json`` / ``.parquet`` / ``.csv`` / ``.arrow`` file, a ``save_to_disk``
directory, another local dataset directory, or a dataset id (``datasets.load_dataset``; offline it is
served from the local cache). Keys: ``split`` (default ``train``; slices like ``train[:1000]`` work for
non-streaming loads), ``name`` (the dataset's configuration), ``streaming=true`` (records are read
lazily, never all in memory), and any other ``FIELD=COLUMN``: the record field a command reads (``text``,
``prompt``, ...) taken from that column. Errors are one line naming the source and what was expected.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fisherdist.errors import FisherdistError

BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
FILE_SUFFIXES = (".jsonl", *BUILDERS)
RESERVED = ("split", "name", "streaming")


@dataclass(frozen=True)
class DataRef:
    """A parsed reference: where the records are, which split, and which column feeds each field."""

    source: str
    split: str | None = None
    name: str | None = None
    streaming: bool = False
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        from fisherdist.config import resolve_path

        return resolve_path(self.source)

    @property
    def is_jsonl(self) -> bool:
        """Read by :mod:`.jsonl` (line-numbered errors): a file of any other suffix, whole."""
        local = self.path.is_file() or (self.looks_local and not self.path.exists())
        return self.path.suffix not in BUILDERS and local and not self.streaming and self.split is None

    @property
    def looks_local(self) -> bool:
        """Named like a file or a path (so a missing one is an error, not a dataset id to look up)."""
        return self.path.suffix in FILE_SUFFIXES or self.source.startswith(("/", ".", "~", "@"))

    def column(self, name: str) -> str:
        return self.columns.get(name, name)


def parse_ref(text: str | Path) -> DataRef:
    """``SOURCE?split=...&name=...&streaming=true&FIELD=COLUMN`` -> :class:`DataRef`."""
    source, _, query = str(text).partition("?")
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False) if query else []
    opts = dict(pairs)
    if len(opts) != len(pairs):
        raise FisherdistError(f"{text}: a key is given twice in the data reference")
    streaming = opts.pop("streaming", "false").lower()
    if streaming not in ("true", "false", "1", "0"):
        raise FisherdistError(f"{text}: streaming={streaming!r}; expected true or false")
    split, name = opts.pop("split", None), opts.pop("name", None)
    return DataRef(source, split or None, name or None, streaming in ("true", "1"), opts)


def with_keys(text: str, keys: dict[str, str | None]) -> str:
    """``text`` with ``keys`` added to its query (the reference's own keys win; ``None`` values are skipped)."""
    from urllib.parse import urlencode

    source, _, query = str(text).partition("?")
    own = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    merged = {**{k: v for k, v in keys.items() if v is not None}, **own}
    return f"{source}?{urlencode(merged, safe='[]:/')}" if merged else source


def check_ref(text: str) -> str:
    """Config-time check: a local source must exist (a dataset id is checked when read). Returns the
    reference with ``@world/`` and ``~`` resolved."""
    ref = parse_ref(text)
    path = ref.path
    if ref.looks_local and not path.exists():
        raise ValueError(f"no data file at {path}")
    if not path.exists():
        return str(text)
    rest = str(text)[len(ref.source):]
    return str(path) + rest


def _dataset(ref: DataRef) -> Any:
    """The split as a ``datasets`` Dataset (or IterableDataset when streaming)."""
    import datasets

    path, split = ref.path, ref.split or "train"
    if ref.looks_local and not path.exists():
        raise FisherdistError(f"{path}: file not found (expected a data file or a dataset directory)")
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            return _from_disk(ref, datasets.load_from_disk(str(path)), split)
        if path.is_file():
            builder = BUILDERS.get(path.suffix, "json" if path.suffix == ".jsonl" else None)
            if builder is None:
                raise FisherdistError(f"{path}: unknown data file type {path.suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}")
            return datasets.load_dataset(builder, data_files=str(path), split=split, streaming=ref.streaming)
        source = str(path) if path.is_dir() else ref.source
        return datasets.load_dataset(source, ref.name, split=split, streaming=ref.streaming)
    except ValueError as e:
        if "corresponds to no data" in str(e):
            raise FisherdistError(f"{ref.source}: no records (split {split} is empty)") from None
        if "split" in str(e).lower():
            raise FisherdistError(f"{ref.source}: no split {split!r} ({_first_line(e)})") from None
        raise FisherdistError(f"{ref.source}: cannot read the dataset ({_first_line(e)})") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise FisherdistError(f"{ref.source}: not a data file, a dataset directory or a dataset id in the local "
                              f"cache ({_first_line(e)})") from None


def _from_disk(ref: DataRef, loaded: Any, split: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FisherdistError(f"{ref.source}: no split {split!r} (available: {', '.join(loaded)})")
        loaded = loaded[split]
    elif ref.split is not None and ref.split != split:
        raise FisherdistError(f"{ref.source}: a single-split dataset directory; drop split={ref.split}")
    return loaded.to_iterable_dataset() if ref.streaming else loaded


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _check_columns(ref: DataRef, columns: Iterable[str] | None, fields: Sequence[str]) -> None:
    if columns is None:  # a stream without features: checked record by record
        return
    have = list(columns)
    for f in fields:
        if ref.column(f) not in have:
            raise FisherdistError(f"{ref.source}: no column {ref.column(f)!r} for field {f!r} (columns: {', '.join(have)})")


def iter_records(text: str | Path, fields: Sequence[str], allow_empty: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """Records with a non-empty string for each of ``fields`` (renamed from their columns), in order."""
    ref = parse_ref(text)
    if ref.is_jsonl:
        from fisherdist.data.jsonl import read_jsonl_records

        for rec in read_jsonl_records(ref.path, [ref.column(f) for f in fields], [ref.column(f) for f in allow_empty]):
            yield rec | {f: rec[ref.column(f)] for f in fields}
        return
    ds = _dataset(ref)
    _check_columns(ref, getattr(ds, "column_names", None), fields)
    n = 0
    for n, row in enumerate(ds, start=1):
        yield _record(ref, row, n, fields, allow_empty)
    if n == 0:
        raise FisherdistError(f"{ref.source}: no records (split {ref.split or 'train'} is empty)")


def _record(ref: DataRef, row: dict[str, Any], n: int, fields: Sequence[str], allow_empty: Sequence[str]) -> dict[str, Any]:
    out = dict(row)
    for f in fields:
        value = row.get(ref.column(f))
        if not isinstance(value, str):
            raise FisherdistError(f"{ref.source}: record {n}: column {ref.column(f)!r} is not a string (got {type(value).__name__})")
        if not value and f not in allow_empty:
            raise FisherdistError(f"{ref.source}: record {n}: column {ref.column(f)!r} is empty")
        out[f] = value
    return out


def read_any(text: str | Path, fields: Sequence[str], allow_empty: Sequence[str] = ()) -> list[dict[str, Any]]:
    """All records in memory (streaming references are read through, too)."""
    return list(iter_records(text, fields, allow_empty))
