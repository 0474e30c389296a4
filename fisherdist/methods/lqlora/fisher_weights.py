"""One matrix's diagonal Fisher as LQ-LoRA uses it: elementwise, or only its row and column sums.

The engine exports per-matrix summaries (``fisherdist export --summary``): a safetensors file with
``<name>.row`` (sum over columns, [out]), ``<name>.col`` (sum over rows, [in]) and ``<name>.total``. From
them the weighted SVD's two-sided scales follow exactly (d_row = sqrt(mean_j F_ij), d_col =
sqrt(mean_i F_ij)), and the elementwise Fisher is replaced by the rank-1 surrogate with the same marginals,
F_ij ~ row_i col_j / total, for which that scaled SVD is the exact weighted optimum. The absolute scale
(sum or mean over samples) cancels in the ILP, so either convention works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fisherdist.errors import FisherdistError

SCALE_FLOOR = 1e-6
"""Scales below this fraction of the largest are raised to it: a zero-Fisher row or column must not make
the unscaled factors infinite (its error then simply weighs almost nothing)."""


@dataclass
class FisherWeights:
    """Row sums, column sums and total of F (and F itself when the caller has it)."""

    row: torch.Tensor
    col: torch.Tensor
    total: float
    full: torch.Tensor | None = None

    @classmethod
    def from_full(cls, fisher: torch.Tensor) -> FisherWeights:
        f = fisher.to(torch.float32)
        return cls(f.sum(dim=1), f.sum(dim=0), float(f.sum()), f)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_row [out, 1], d_col [1, in]) for the two-sided weighted SVD."""
        d_row = (self.row.clamp_min(0) / self.col.numel()).sqrt()
        d_col = (self.col.clamp_min(0) / self.row.numel()).sqrt()
        return _floor(d_row)[:, None], _floor(d_col)[None, :]

    def sq_error(self, residual: torch.Tensor) -> float:
        """||sqrt(F) . E||_F^2, with the rank-1 surrogate when only the sums are known."""
        sq = residual.to(torch.float32).square()
        if self.full is not None:
            return float((self.full * sq).sum())
        if self.total <= 0:
            return 0.0
        return float(self.row @ sq @ self.col) / self.total


def _floor(d: torch.Tensor) -> torch.Tensor:
    top = d.max() if d.numel() else torch.tensor(0.0)
    return torch.ones_like(d) if top <= 0 else d.clamp_min(top * SCALE_FLOOR)


def sq_error(residual: torch.Tensor, fisher: FisherWeights | None) -> float:
    """Weighted squared error, or the plain squared Frobenius norm when data-agnostic."""
    return float(residual.to(torch.float32).square().sum()) if fisher is None else fisher.sq_error(residual)


def load_summaries(path: str | Path, names: Iterable[str]) -> dict[str, FisherWeights]:
    """Read only ``names``' summaries from ``path`` (each rank asks for its own matrices)."""
    out: dict[str, FisherWeights] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name in names:
            missing = [k for k in (f"{name}.row", f"{name}.col", f"{name}.total") if k not in keys]
            if missing:
                raise FisherdistError(f"{path}: no Fisher summary {missing[0]!r} (expected <name>.row/.col/.total "
                                      "from `fisherdist export --summary` for every target matrix)")
            row, col = f.get_tensor(f"{name}.row").to(torch.float32), f.get_tensor(f"{name}.col").to(torch.float32)
            out[name] = FisherWeights(row.reshape(-1), col.reshape(-1), float(f.get_tensor(f"{name}.total").sum()))
    return out


def fisher_loader(path: str | Path, names: Sequence[str]) -> Callable[[str], FisherWeights]:
    """name -> its Fisher, read when asked: elementwise from a ``lqlora fisher`` folder (one matrix in memory
    at a time), or row/column summaries from a ``fisherdist export --summary`` file. Names are checked now."""
    if not Path(path).is_dir():
        return load_summaries(path, names).__getitem__
    from fisherdist.methods.lqlora.fisher_stage import fisher_files

    files = fisher_files(path, names)

    def get(name: str) -> FisherWeights:
        with safe_open(str(files[name]), framework="pt") as f:
            return FisherWeights.from_full(f.get_tensor(name))

    return get
