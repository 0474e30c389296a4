"""LQ-LoRA's configuration search space: the full 432-configuration grid of the paper and a small one for
the tiny world and tests."""

from __future__ import annotations

import itertools

from fisherdist.errors import ConfigError
from fisherdist.models.quant import QConfig


def full_grid() -> list[QConfig]:
    """b in {2,3,4,8} x b0 in {2,3,4,8} x b1 in {bf16,fp16,fp32} x B0 in {16,32,64} x B1 in {16,64,256}."""
    return [QConfig(b, B0, b0, b1, B1) for b, b0, b1, B0, B1 in
            itertools.product((2, 3, 4, 8), (2, 3, 4, 8), ("bf16", "fp16", "fp32"), (16, 32, 64), (16, 64, 256))]


def small_grid() -> list[QConfig]:
    """b in {2,3,4,8} x B0 in {32,64}, 8-bit fp32 double-quantized scales in blocks of 256 (QLoRA's nf3/nf4
    are in it)."""
    return [QConfig(b, B0, 8, "fp32", 256) for b in (2, 3, 4, 8) for B0 in (32, 64)]


GRIDS = {"full": full_grid, "small": small_grid}


def grid(name: str) -> list[QConfig]:
    if name not in GRIDS:
        raise ConfigError(f"--grid {name!r}: expected one of {sorted(GRIDS)}")
    return GRIDS[name]()
