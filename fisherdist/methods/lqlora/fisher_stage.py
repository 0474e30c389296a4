"""LQ-LoRA's calibration Fisher: one pass of the sharded engine, then each matrix's elementwise Fisher is
reduced onto the one rank that will decompose it (the same whole-matrix owner as the decomposition), one
matrix at a time, so no rank ever holds the Fisher of the whole model.

Files: ``OUT/fisher/part-<rank>.safetensors`` (the owner's matrices, keyed by weight name, mean
convention; the paper's sum differs by the sample count, which cancels in the ILP) and
``OUT/fisher/index.json`` (name -> file). A later stage on any world size reads each matrix by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from fisherdist.atomic import write_text
from fisherdist.distributed.collectives import assign_owners, barrier, rank_world
from fisherdist.fisher.api import DEFAULT_STATE
from fisherdist.methods.lqlora.placement import Target

INDEX = "index.json"


def owners(targets: Sequence[Target], world: int) -> dict[str, int]:
    """Matrix -> the rank that decomposes it (whole matrices, balanced by size; see ``placement.mine``)."""
    return {t.name: r for t, r in zip(targets, assign_owners([t.numel for t in targets], world))}


def reduce_to_owners(acc: Any, targets: Sequence[Target], owner: dict[str, int]) -> dict[str, torch.Tensor]:
    """This rank's matrices' full Fisher (collective: one reduce per matrix, to its owner only)."""
    rank, world = rank_world()
    counts = acc.states[DEFAULT_STATE].global_counts()
    mine = {}
    for t in targets:
        frag, values = acc.fragment(t.name), acc.fisher(t.name, counts=counts)
        full = torch.zeros(t.numel, dtype=torch.float32, device=values.device)
        full[frag.start : frag.start + frag.numel] = values.reshape(-1).to(torch.float32)
        if world > 1:
            dist.reduce(full, dst=owner[t.name])
        if owner[t.name] == rank:
            mine[t.name] = full.reshape(t.shape).cpu()
        del full
    return mine


def save_parts(folder: Path, mine: dict[str, torch.Tensor], owner: dict[str, int]) -> None:
    """Every rank writes its part (temp sibling, then rename); rank 0 the index, after a barrier."""
    rank, _ = rank_world()
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"part-{rank:05d}.safetensors"
    tmp = part.with_name(f".{part.name}.tmp")
    save_file({k: v.contiguous() for k, v in mine.items()}, str(tmp))
    tmp.replace(part)
    barrier()
    if rank == 0:
        index = {name: f"part-{r:05d}.safetensors" for name, r in sorted(owner.items())}
        write_text(folder / INDEX, json.dumps({"fisher": "empirical, per sample, mean", "matrices": index}, indent=1) + "\n")
    barrier()


def fisher_files(folder: str | Path, names: Sequence[str]) -> dict[str, Path]:
    """name -> the part file holding its Fisher (a missing matrix is one error line)."""
    from fisherdist.errors import FisherdistError

    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX).read_text())["matrices"]
    except (OSError, ValueError, KeyError) as e:
        raise FisherdistError(f"{folder / INDEX}: no Fisher index (run `lqlora fisher` first): {e}") from None
    missing = [n for n in names if n not in index]
    if missing:
        raise FisherdistError(f"{folder / INDEX}: no Fisher for {missing[0]!r} ({len(missing)} matrices missing)")
    return {n: folder / index[n] for n in names}
