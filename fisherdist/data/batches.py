"""Turning records (any data reference, :mod:`fisherdist.data.source`) into per-rank micro-batches: one
record is one sample, never packed.

Every rank gets the same number of micro-batches (collectives must line up); the last ones are topped up
with copies marked ``valid=False``, which carry no loss and are not counted. Step s of rank r holds records
``[(s*world + r)*B, ... + B)`` of the records left after a resume position, for in-memory lists and
streams alike, so a resume counted in records is independent of the world size.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from fisherdist.data.jsonl import read_records
from fisherdist.data.source import iter_records, parse_ref
from fisherdist.errors import FisherdistError


def load_texts(path: str | Path, field: str, num_samples: int | None = None, shuffle: bool = False, seed: int = 0) -> list[str]:
    """The ``field`` of the first ``num_samples`` records (file order unless ``shuffle``)."""
    records = read_records(path, [field])
    if shuffle:
        random.Random(seed).shuffle(records)
    if num_samples is not None and num_samples > len(records) and os.environ.get("RANK", "0") == "0":
        print(f"fisherdist: warning: {path}: num_samples={num_samples} but the file has {len(records)} records; "
              f"using {len(records)}", file=sys.stderr, flush=True)
    if num_samples is not None:
        records = records[:num_samples]
    return [rec[field] for rec in records]


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids per record, truncated to ``max_length`` (BOS added as the tokenizer does)."""
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def collate(samples: list[list[int]], pad_id: int, valid: list[bool] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding), and ``valid`` if given."""
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if valid is not None:
        batch["valid"] = torch.tensor(valid)
    return batch


def rank_batches(token_lists: list[list[int]], batch_size: int, rank: int, world: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches: step s holds records ``[(s*world + rank)*batch_size, ... + batch_size)``."""
    per_step = batch_size * world
    steps = -(-len(token_lists) // per_step)
    batches = []
    for s in range(steps):
        lo = (s * world + rank) * batch_size
        idx = list(range(lo, lo + batch_size))
        valid = [i < len(token_lists) for i in idx]
        samples = [token_lists[i] if ok else token_lists[0] for i, ok in zip(idx, valid)]
        batches.append(collate(samples, pad_id, valid))
    return batches


def stream_rank_batches(texts: Iterable[str], encode: Callable[[str], list[int]], batch_size: int, rank: int,
                        world: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`rank_batches` over a stream: the same records per rank and the same top-up, one step at a
    time; a rank tokenizes only its own records (and the first, which tops up the last step)."""
    per_step = batch_size * world
    first: list[int] | None = None
    own: list[list[int]] = []
    i = -1
    for i, text in enumerate(texts):
        mine = (i % per_step) // batch_size == rank
        tokens = encode(text) if mine or i == 0 else []
        if i == 0:
            first = tokens
        if mine:
            own.append(tokens)
        if i % per_step == per_step - 1:
            yield collate(own, pad_id, [True] * len(own))
            own = []
    if first is not None and (i + 1) % per_step:
        top_up = batch_size - len(own)
        yield collate(own + [first] * top_up, pad_id, [True] * len(own) + [False] * top_up)


def data_batches(ref: str, field: str, tokenizer: Any, max_length: int, batch_size: int, rank: int, world: int, *,
                 skip: int = 0, num_samples: int | None = None, shuffle: bool = False,
                 seed: int = 0) -> tuple[Iterable[dict[str, torch.Tensor]], int | None]:
    """This rank's micro-batches of the records after the first ``skip`` (a resume position), and their
    number (None for a streaming reference, read lazily)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if parse_ref(ref).streaming:
        if shuffle:
            raise FisherdistError(f"{ref}: data.shuffle needs the whole dataset in memory; not with streaming=true")
        texts = islice((rec[field] for rec in iter_records(ref, [field])), skip, num_samples)
        return stream_rank_batches(texts, lambda t: tokenize([t], tokenizer, max_length)[0], batch_size, rank, world, pad), None
    tokens = tokenize(load_texts(ref, field, num_samples, shuffle, seed)[skip:], tokenizer, max_length)
    batches = rank_batches(tokens, batch_size, rank, world, pad) if tokens else []
    return batches, len(batches)
