"""Which rank decomposes which matrix: whole matrices, balanced by work, never a shard of one."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from fisherdist.config import resolve_path
from fisherdist.distributed.collectives import assign_owners
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


def mine(targets: Sequence[Target], rank: int, world: int) -> list[Target]:
    """This rank's matrices; the work of one matrix grows with its size (quantization and the SVD sketch)."""
    owner = assign_owners([t.numel for t in targets], world)
    return [t for t, r in zip(targets, owner) if r == rank]
