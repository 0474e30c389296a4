"""Run checkpoints that survive preemption and load on any number of processes.

A checkpoint is one ``torch.distributed.checkpoint`` (DCP) directory ``DIR/step-N`` holding named states
(model + optimizer, the Fisher state, method state, progress). Keys are names, never ranks, and sharded
tensors are DTensors, so DCP reshards on load when the world size changes. Plain tensors are treated as
replicated and saved once (from rank 0): only put identical-on-every-rank values there.

Crash safety: every rank writes into ``DIR/.tmp-step-N``; after a barrier rank 0 adds ``run.json``
(world size, backend, step, config hash, per-file sizes and SHA-256) and the ``.complete`` marker, then
renames the directory to ``DIR/step-N`` (atomic on POSIX) and only then prunes older checkpoints to the
last ``keep_last``. An interrupted save leaves a ``.tmp-*`` directory that :meth:`RunCheckpointer.latest`
ignores, so the previous checkpoint stays the one that loads.

RNG: derive randomness from :func:`step_seed` (seed, step, rank) instead of saving per-rank generator
states; those cannot be resharded when the world size changes, a per-step seed can.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp  # called as dcp.save / dcp.load: tests inject faults there
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from fisherdist.distributed.collectives import barrier, is_main, rank
from fisherdist.errors import CheckpointError
from fisherdist.integrity import MANIFEST, sha256

COMPLETE = ".complete"
RUN_META = "run.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed that depends only on (seed, step, rank): reproducible after a resume on any world size."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


def config_hash(text: str) -> str:
    """Short hash of the run's config text, stored so a resume with a different config is visible."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ModelOptimizerState(Stateful):
    """Model (+ optimizer) through ``get_state_dict``/``set_state_dict``: FQN keys, DTensor shards under
    FSDP2, so the same checkpoint loads into any world size or wrapper that keeps parameter names."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        optims = [self.optimizer] if self.optimizer is not None else []
        model_sd, optim_sd = get_state_dict(self.model, optims)
        return {"model": model_sd, "optim": optim_sd} if optims else {"model": model_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        optims = [self.optimizer] if self.optimizer is not None else []
        set_state_dict(self.model, optims, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict.get("optim", {}))  # fmt: skip


def hash_dcp_files(tmp: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file of a DCP directory; each rank hashes the shard files it wrote
    (``__<rank>_*``), so no rank reads the whole checkpoint. Collective; the merged table is meaningful on
    rank 0 (run checkpoints' ``run.json`` and Fisher states' ``MANIFEST.json`` both use it)."""
    me = rank()
    mine = [p for p in tmp.iterdir() if p.is_file() and (p.name.startswith(f"__{me}_") or (me == 0 and not p.name.startswith("__")))]
    table = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in mine if p.name != MANIFEST}
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, table)
        table = {k: v for part in parts for k, v in part.items()}
    return dict(sorted(table.items()))


def _flat_expected(states: Mapping[str, Any]) -> dict[str, Any]:
    """The keys DCP will save/load for ``states`` (Stateful values expanded, nested dicts dotted)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    expanded = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in states.items()}
    return flatten_state_dict(expanded)[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunCheckpointer:
    """Save/find/load run checkpoints under one directory, keeping the last ``keep_last`` complete ones."""

    def __init__(self, directory: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.dir, self.keep_last = Path(directory), keep_last

    # ---- finding -------------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (``.tmp-*`` leftovers and unmarked directories ignored)."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_RE.match(p.name))]
        return sorted((s, p) for s, p in found if (p / COMPLETE).is_file())

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None`` when there is none (a fresh run)."""
        ckpts = self.checkpoints()
        return ckpts[-1][1] if ckpts else None

    # ---- saving --------------------------------------------------------------------------------
    def save(self, step: int, states: Mapping[str, Any], *, backend: str = "", config_text: str = "",
             extra: Mapping[str, Any] | None = None) -> Path:
        """Collective: every rank calls it with the same step. Returns ``DIR/step-N``."""
        final, tmp = self.dir / f"step-{step}", self.dir / f".tmp-step-{step}"
        if is_main():
            if tmp.exists():
                shutil.rmtree(tmp)  # a leftover of an interrupted save of this very step
            tmp.mkdir(parents=True)
        barrier()
        dcp.save(dict(states), checkpoint_id=str(tmp))
        barrier()  # every rank's shard files are written (DCP's own finish step also synchronises)
        files = hash_dcp_files(tmp)
        if is_main():
            meta = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "backend": backend, "config_hash": config_hash(config_text) if config_text else "",
                    "saved_at": time.time(), "files": files, "extra": dict(extra or {})}  # fmt: skip
            (tmp / RUN_META).write_text(json.dumps(meta, indent=1))
            (tmp / COMPLETE).write_text(f"step {step}\n")
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (a resume preempted before its next step): swap, never delete first
                old = self.dir / f".old-step-{step}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            _fsync_dir(self.dir)
            self._prune(keep=final)
        barrier()
        return final

    def _prune(self, keep: Path) -> None:
        """Delete all but the last K complete checkpoints and stale ``.tmp-*`` dirs (rank 0, after rename)."""
        ckpts = self.checkpoints()
        for _, path in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            if path != keep:
                shutil.rmtree(path)
        for stale in self.dir.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------------------
    def load(self, states: Mapping[str, Any], path: str | Path | None = None, *, verify: bool = True) -> dict[str, Any]:
        """Load ``path`` (default: :meth:`latest`) into ``states`` in place, resharding as needed.

        Returns the checkpoint's ``run.json``. Every problem is one :class:`CheckpointError` line naming the
        file: missing/truncated/corrupted shard files, missing ``.metadata``, names or shapes that differ.
        """
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise CheckpointError(f"{self.dir}: no complete checkpoint (no step-N/{COMPLETE})")
        meta = verify_checkpoint(path, check_hashes=verify)
        check_matches(path, states)
        try:
            dcp.load(dict(states), checkpoint_id=str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: failed to load ({_one_line(e)})") from None
        return meta


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln and not ln.startswith(" ")]
    return (lines[-1] if lines else type(e).__name__)[:240]


def read_metadata(path: Path) -> Metadata:
    """DCP's ``.metadata`` of ``path`` or a :class:`CheckpointError` naming the file."""
    meta_file = path / ".metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing (not a DCP checkpoint, or an interrupted save)")
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{meta_file}: unreadable checkpoint metadata ({_one_line(e)})") from None


def verify_checkpoint(path: str | Path, check_hashes: bool = True) -> dict[str, Any]:
    """Check completeness, ``.metadata`` and every shard file (exists, long enough, SHA-256 as saved)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path / COMPLETE}: missing (the save of {path.name} did not finish)")
    try:
        meta: dict[str, Any] = json.loads((path / RUN_META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / RUN_META}: unreadable ({e})") from None
    metadata = read_metadata(path)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard file missing")
        size = shard.stat().st_size
        if size < end:
            raise CheckpointError(f"{shard}: truncated ({size} bytes, the metadata needs {end})")
        saved = meta.get("files", {}).get(name)
        if check_hashes and saved and sha256(shard) != saved["sha256"]:
            raise CheckpointError(f"{shard}: corrupted (SHA-256 differs from the one recorded at save time)")
    return meta


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def check_matches(path: str | Path, states: Mapping[str, Any]) -> None:
    """Names and global shapes in the checkpoint must equal those of ``states`` (before DCP reads data)."""
    path = Path(path)
    saved = read_metadata(path).state_dict_metadata
    expected = _flat_expected(states)
    missing = sorted(set(expected) - set(saved))
    # Loading a part of a checkpoint (e.g. only the model) is fine; inside a loaded part, extra names are not.
    parts = {".".join(k.split(".")[:2]) for k in expected}
    extra = sorted(k for k in set(saved) - set(expected)
                   if ".".join(k.split(".")[:2]) in parts and not isinstance(saved[k], BytesStorageMetadata))  # fmt: skip
    if missing or extra:
        problems = ([f"missing {', '.join(missing[:4])}"] if missing else []) + ([f"unexpected {', '.join(extra[:4])}"] if extra else [])
        raise CheckpointError(f"{path / '.metadata'}: parameter names do not match the model ({'; '.join(problems)})")
    for key, value in expected.items():
        want, have = _shape(value), getattr(saved[key], "size", None)
        if want is not None and have is not None and tuple(have) != want:
            raise CheckpointError(f"{path / '.metadata'}: {key} has shape {tuple(have)} in the checkpoint, the model has {want}")
