"""Sequence packing for pretraining: documents -> one token stream -> fixed-length sequences.

Each document is tokenised as the tokenizer's special prefix (e.g. BOS) + its text + EOS, the documents
are concatenated in file order, and the stream is cut into consecutive sequences of ``length`` tokens;
only the last sequence may be shorter, so no padding is spent except there. Every token lands in exactly
one sequence, in order, and the sequences depend on the data and ``length`` alone: the trainer treats each
as one record, so the record-to-rank rule, shuffling and world-size-independent resume are the ones of
every other recipe. Attention is not masked at document boundaries (a document may attend to the end of
the previous one, separated by EOS), as in GPT-style packed pretraining; positions run through the
whole sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from fisherdist.errors import FisherdistError


def pack_documents(documents: Iterable[Sequence[int]], length: int, eos: int) -> list[list[int]]:
    """The documents, each followed by ``eos``, as consecutive ``length``-token sequences (the last one
    holds what is left)."""
    if length < 2:
        raise FisherdistError(f"packing: sequence length {length}; expected at least 2 tokens")
    stream = [t for doc in documents for t in (*doc, eos)]
    return [stream[i : i + length] for i in range(0, len(stream), length)]


def pack_texts(texts: Iterable[str], tokenizer: Any, length: int) -> list[list[int]]:
    """:func:`pack_documents` of prefix + text tokens, with the tokenizer's EOS as separator."""
    from fisherdist.data.jsonl import encode, special_prefix

    eos = tokenizer.eos_token_id
    if eos is None:
        raise FisherdistError("packing: the tokenizer has no eos_token_id to separate documents "
                              "(set data.pack: false)")
    lead = special_prefix(tokenizer)
    return pack_documents((lead + encode(tokenizer, text) for text in texts), length, int(eos))
