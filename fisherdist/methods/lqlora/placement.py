"""Which rank decomposes which matrix: whole matrices, balanced by work, never a shard of one."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from fisherdist.config import resolve_path
from fisherdist.errors import FisherdistError


@dataclass(frozen=True)
class Target:
    name: str
    file: Path
    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def find_targets(model_dir: str | Path, pattern: str) -> list[Target]:
    """2-D weights whose names match ``pattern``, from the headers only (no tensor is read); ``@world/...``
    names the shipped tiny world."""
    files = sorted(resolve_path(model_dir).glob("*.safetensors"))
    if not files:
        raise FisherdistError(f"{model_dir}: no *.safetensors weights found")
    regex = re.compile(pattern)
    out = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if len(shape) == 2 and regex.search(name):
                    out.append(Target(name, file, (int(shape[0]), int(shape[1]))))
    if not out:
        raise FisherdistError(f"{model_dir}: no 2-D weight matches --targets {pattern!r}")
    return sorted(out, key=lambda t: t.name)


def balance(work: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: longest-processing-time greedy (largest first to the least-loaded rank,
    ties to the lower rank), within 4/3 of the best possible maximum load."""
    load = [0.0] * world
    owner = [0] * len(work)
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += work[i]
    return owner


def mine(targets: Sequence[Target], rank: int, world: int) -> list[Target]:
    """This rank's matrices; the work of one matrix grows with its size (quantization and the SVD sketch)."""
    owner = balance([t.numel for t in targets], world)
    return [t for t, r in zip(targets, owner) if r == rank]
