"""Per-parameter optimizer state: shapes, shardings and the memory it takes, by part.

Under FSDP2 every sharded piece of state is a DTensor with the global shape (moments and window of a
``right`` projection sharded on rows like the gradient, of a ``left`` one on columns; a ``right``
projector replicated, a ``left`` one on rows), so ``torch.distributed.checkpoint`` saves it keyed by
parameter FQN and reshards it on load. Step counters are CPU tensors, as in ``torch.optim.AdamW``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fisherdist.errors import FisherdistError
from fisherdist.optim.layout import Layout, local
from fisherdist.optim.subspace import side_of

StateParts = dict[str, int]


def _zeros(layout: Layout, rows: torch.Tensor, shape: tuple[int, ...], dim: int | None, by_rows: bool,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zeros of global ``shape``: this rank's piece when sharded on ``dim``, which is split like the
    parameter's rows (``by_rows``) or, for a ``left`` projection's columns, as DTensor ``Shard`` splits it."""
    piece = list(shape)
    if dim is not None and layout.sharded:
        start, end = (0, rows.shape[0]) if by_rows else layout.columns(shape[dim])
        piece[dim] = end - start
    tensor = torch.zeros(piece, dtype=dtype or rows.dtype, device=rows.device)
    return layout.wrap(tensor, shape, dim)


def init_state(state: dict[str, Any], param: torch.Tensor, group: dict[str, Any],
               history_dtype: torch.dtype | None) -> None:
    """Create this parameter's moments (and projector and window) on its first step."""
    state["step"] = torch.tensor(0.0)
    if "rank" not in group:
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
        return
    if param.dim() != 2:
        raise FisherdistError(
            f"GaLore: a param group with 'rank' holds a {param.dim()}-D tensor of shape {tuple(param.shape)}; "
            "GaLore projects 2-D weight matrices (DeepSpeed ZeRO hands the optimizer flat partitions that cut "
            "across matrices: use DDP, FSDP2 or DeepSpeed without ZeRO)")
    layout, rows = Layout.of(param), local(param)
    m, n = layout.shape
    r = min(int(group["rank"]), m, n)
    right = side_of(group.get("proj_type", "std"), layout.shape) == "right"
    low, low_dim = ((m, r), 0) if right else ((r, n), 1)
    state["projector"] = _zeros(layout, rows, (r, n) if right else (m, r), None if right else 0, True)
    state["exp_avg"] = _zeros(layout, rows, low, low_dim, right)
    state["exp_avg_sq"] = _zeros(layout, rows, low, low_dim, right)
    if int(group["history"]) > 0:
        window = (int(group["history"]), *low)
        state["history"] = _zeros(layout, rows, window, low_dim + 1, right, history_dtype)


def state_bytes(states: Iterable[dict[str, Any]], grams: Iterable[torch.Tensor]) -> StateParts:
    """Bytes this rank holds, by part (the s x s Gram caches count with the history)."""
    parts = {"moments": 0, "projectors": 0, "history": sum(g.numel() * g.element_size() for g in grams)}
    names = {"exp_avg": "moments", "exp_avg_sq": "moments", "projector": "projectors", "history": "history"}
    for state in states:
        for key, part in names.items():
            if key in state:
                t = local(state[key])
                parts[part] += t.numel() * t.element_size()
    return parts
