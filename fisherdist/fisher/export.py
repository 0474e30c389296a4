"""Export a Fisher checkpoint as safetensors: one float32 tensor per target parameter, MEAN convention.

Tensors are named as in the unwrapped model's ``named_parameters()`` and shaped like the parameter
(K-FAC: ``<layer>.A`` and ``<layer>.G``, square);
F = (1/N) sum_i g_i * g_i for the diagonal estimators (centered: minus the squared mean, clamped at 0;
rank1: the mean gradient). The metadata (estimator, granularity, counts, backend, ...) goes in the header.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fisherdist.atomic import publish_file
from fisherdist.errors import FisherdistError
from fisherdist.fisher.checkpoint import read_fisher
from fisherdist.fisher.layout import Fragment
from fisherdist.fisher.summary import summarise


def mean_fisher(stats: dict[str, dict[str, torch.Tensor]], estimator: str, weight: float) -> dict[str, torch.Tensor]:
    """The estimator's mean-convention value from the saved running sums."""
    if weight <= 0:
        raise FisherdistError("the Fisher checkpoint holds no samples (counts.weight is 0)")
    if estimator == "rank1":
        return {f: t / weight for f, t in stats["first"].items()}
    if estimator == "kfac":
        raise AssertionError("K-FAC factors are normalised by kfac_factors()")
    out = {}
    for f, sq in stats["sq"].items():
        value = sq / weight
        if estimator == "centered":
            value = (value - (stats["first"][f] / weight) ** 2).clamp_min(0)
        out[f] = value
    return out


def kfac_factors(stats: dict[str, dict[str, torch.Tensor]], counts: dict[str, float]) -> dict[str, torch.Tensor]:
    """``layer.A`` = sum a a^T / tokens, ``layer.G`` = sum g g^T / samples."""
    return {f: t / (counts["tokens"] if f.endswith(".A") else counts["samples"]) for f, t in stats["sum"].items()}


def export_safetensors(src: Path, out: Path, *, summary: bool = False) -> Path:
    """Every target's mean-convention Fisher, or with ``summary`` its ``<name>.row`` / ``.col`` / ``.total``
    (float64; see :mod:`fisherdist.fisher.summary`)."""
    ckpt = src / "fisher" if (src / "fisher" / ".metadata").is_file() else src
    stats, counts, meta = read_fisher(ckpt)
    shapes = {f: tuple(s) for f, s in meta.get("shapes", {}).items()}
    if summary and meta["estimator"] == "kfac":
        raise FisherdistError(f"{ckpt}: --summary summarises a diagonal Fisher; this checkpoint holds K-FAC factors")
    values = kfac_factors(stats, counts) if meta["estimator"] == "kfac" else mean_fisher(stats, meta["estimator"], counts["weight"])
    tensors = {}
    for fqn, value in values.items():
        shape = shapes.get(fqn, tuple(value.shape))
        tensors[fqn] = value.to(torch.float32).reshape(shape).contiguous()
    if summary:
        tensors = {k: v.contiguous() for k, v in summarise(
            {f: (Fragment(f, t.shape, 0, t.numel()), values[f]) for f, t in tensors.items()}).items()}
    header = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items() if k != "shapes"}
    header.update({f"counts.{k}": repr(v) for k, v in counts.items()})
    header["convention"] = "mean: F = (1/N) sum_i w_i g_i^2 (N = counts.weight)"
    if summary:
        header["summary"] = "<name>.row / .col / .total: sums of the mean Fisher over (d0, prod(rest))"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    return publish_file(tmp, out)
