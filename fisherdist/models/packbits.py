"""Pack b-bit unsigned codes densely into bytes (b in 1..8) and back, vectorised.

Codes are grouped so that a group fills whole bytes (g = 8 / gcd(8, b) codes in g*b/8 bytes: 4 two-bit,
8 three-bit, 2 four-bit codes); within a group the first code sits in the highest bits. For b = 4 this is
bitsandbytes' NF4 layout (first element in the high nibble), so packed NF4 bytes are interchangeable.
"""

from __future__ import annotations

import math

import torch


def group(bits: int) -> tuple[int, int]:
    """(codes per group, bytes per group) for ``bits``-bit codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    codes = 8 // math.gcd(8, bits)
    return codes, codes * bits // 8


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes: whole groups, so the last group is padded with zero codes."""
    codes, nbytes = group(bits)
    return -(-count // codes) * nbytes


def _word_dtype(nbytes: int) -> torch.dtype:
    """One byte is handled as uint8 (cheapest); up to 3 bytes fit an int32 word, 5 or 7 need int64."""
    return torch.uint8 if nbytes == 1 else torch.int32 if nbytes <= 3 else torch.int64


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 tensor of ``packed_nbytes(codes.numel(), bits)`` bytes holding ``codes`` (< 2**bits)."""
    per, nbytes = group(bits)
    flat = codes.reshape(-1).to(_word_dtype(nbytes))
    cols = torch.nn.functional.pad(flat, (0, (-flat.numel()) % per)).view(-1, per)
    words = cols[:, 0] << (bits * (per - 1))
    for i in range(1, per):
        words |= cols[:, i] << (bits * (per - 1 - i))
    if nbytes == 1:
        return words
    return torch.stack([(words >> (8 * (nbytes - 1 - k))) & 0xFF for k in range(nbytes)], 1).to(torch.uint8).view(-1)


def unpack(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of ``data`` (from :func:`pack`), as int64 (ready to index a table)."""
    per, nbytes = group(bits)
    rows = data.reshape(-1, nbytes).to(_word_dtype(nbytes))
    words = rows[:, 0].clone()
    for k in range(1, nbytes):
        words = (words << 8) | rows[:, k]
    mask = (1 << bits) - 1
    codes = torch.stack([(words >> (bits * (per - 1 - i))) & mask for i in range(per)], 1)
    return codes.reshape(-1)[:count].to(torch.int64)
