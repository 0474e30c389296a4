"""Per-matrix summaries of the diagonal Fisher in the mean convention: row sums, column sums and total.

A surrogate that scores a matrix by rows x columns (LQ-LoRA) needs only these, so each rank sums its own
fragment and the small vectors are summed over ranks; no matrix is ever gathered. A tensor of shape
``(d0, *rest)`` is summarised as the ``(d0, prod(rest))`` matrix (a vector as a column).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fisherdist.fisher.layout import Fragment


def fragment_sums(frag: Fragment, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row, col, total)`` of one fragment's flat ``values`` (``param.view(-1)[start:start+numel]``)."""
    rows = frag.shape[0] if frag.shape else 1
    cols = math.prod(frag.shape[1:]) if len(frag.shape) > 1 else 1
    index = torch.arange(frag.start, frag.start + frag.numel, device=values.device)
    v = values.reshape(-1).to(torch.float64)
    row = torch.zeros(rows, dtype=torch.float64, device=values.device).index_add_(0, index // cols, v)
    col = torch.zeros(cols, dtype=torch.float64, device=values.device).index_add_(0, index % cols, v)
    return row, col, v.sum().reshape(1)


def summarise(fragments: dict[str, tuple[Fragment, torch.Tensor]],
              group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """``{<name>.row, <name>.col, <name>.total}`` over all ranks (collective when a group is up): one
    all-reduce of the concatenated sums."""
    parts = {fqn: fragment_sums(frag, values) for fqn, (frag, values) in fragments.items()}
    flat = torch.cat([t for sums in parts.values() for t in sums]) if parts else torch.zeros(0, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    out, pos = {}, 0
    for fqn, sums in parts.items():
        for key, t in zip(("row", "col", "total"), sums):
            out[f"{fqn}.{key}"] = flat[pos : pos + t.numel()]
            pos += t.numel()
    return out
