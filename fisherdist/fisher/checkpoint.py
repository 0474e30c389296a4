"""Saving, loading (with resharding) and reading Fisher states written by ``torch.distributed.checkpoint``.

The on-disk layout is ``{"fisher": FisherState.state_dict()}``: statistics as sharded tensors keyed by
parameter FQN, counts and the metadata JSON. Any world size and backend can load it: DCP reshards the flat
ranges into the loader's placement. ``MANIFEST.json`` (sizes, SHA-256, the settings that define the state;
see :mod:`fisherdist.integrity`) is written last and verified before any load or export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException as DCPException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from fisherdist.atomic import swap_in
from fisherdist.distributed.checkpoint import hash_dcp_files
from fisherdist.distributed.collectives import barrier, is_main
from fisherdist.errors import CheckpointError
from fisherdist.fisher.state import FisherState
from fisherdist.integrity import IntegrityError, verify_dir, write_manifest

KEY = "fisher"


def save_fisher(state: FisherState, path: str | Path, settings: Mapping[str, Any] | None = None) -> Path:
    """Write to ``path.tmp-*``, add the manifest (recording ``settings``) and rename, so an interrupted save
    never replaces a good checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if is_main() and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    dcp.save({KEY: state}, checkpoint_id=str(tmp))
    barrier()
    files = hash_dcp_files(tmp)
    if is_main():
        write_manifest(tmp, files, settings)
        swap_in(tmp, path)
    barrier()
    return path


def _shards(path: Path) -> str:
    return "[" + ", ".join(sorted(p.name for p in path.glob("*.distcp"))) + "]"


def _first_line(e: BaseException) -> str:
    """DCP wraps per-rank tracebacks; keep the innermost error's type for a one-line message."""
    text = str(e).strip().splitlines()
    last = next((line for line in reversed(text) if line and not line.startswith(" ")), type(e).__name__)
    return last[:200]


def _metadata(path: Path) -> Any:
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a Fisher checkpoint (no {path / '.metadata'})")
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path / '.metadata'}: unreadable checkpoint metadata ({e})") from None


def check_compatible(state: FisherState, path: str | Path) -> None:
    """Parameter names and sizes in the checkpoint must be exactly the state's targets."""
    path = Path(path)
    saved = {k: v for k, v in _metadata(path).state_dict_metadata.items() if k.startswith(f"{KEY}.stats.")}
    prefix = f"{KEY}.stats."
    for stat in state.stats:
        for fqn, shape in state.placement.shapes.items():
            key = f"{prefix}{stat}.{fqn}"
            if key not in saved:
                raise CheckpointError(f"{path}: no statistic {stat!r} for parameter {fqn} (names do not match the model)")
            numel = int(torch.Size(shape).numel())
            if tuple(saved[key].size) != (numel,):
                raise CheckpointError(f"{path}: {fqn} has {tuple(saved[key].size)} elements saved, model needs ({numel},)")
    extra = sorted(k[len(prefix):] for k in saved if k.split(".", 3)[-1] not in state.placement.shapes)
    if extra:
        raise CheckpointError(f"{path}: checkpoint has parameters the model does not target: {', '.join(extra[:3])}")


def _verify_on_all_ranks(state: FisherState, path: Path) -> None:
    """Every rank checks sizes, one rank per node reads and hashes (not N copies of a 280 GB state); damage
    found by any rank stops all of them with the same line, before a collective load could hang."""
    damage: IntegrityError | None = None
    try:
        verify_dir(path, hashes=os.environ.get("LOCAL_RANK", "0") == "0")
    except IntegrityError as e:
        damage = e
    flag = torch.tensor([float(damage is not None)], device=state.local_counts["weight"].device)
    if dist.is_initialized() and state.placement.world > 1:
        dist.all_reduce(flag, group=state.group)  # the ranks that share this state, as its counts do
    if flag.item():
        raise damage or IntegrityError(f"{path}: damaged (another rank's SHA-256 check failed; see its message)")


def load_fisher(state: FisherState, path: str | Path) -> None:
    """Load (and reshard) a checkpoint into ``state``; further accumulation adds to the loaded sums."""
    path = Path(path)
    _verify_on_all_ranks(state, path)
    check_compatible(state, path)
    try:
        dcp.load({KEY: state}, checkpoint_id=str(path))
    except CheckpointError:
        raise
    except (Exception, DCPException) as e:
        raise CheckpointError(f"{path}: failed to read the checkpoint's shard files {_shards(path)} ({_first_line(e)})") from None


def read_fisher(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float], dict[str, Any]]:
    """Whole tensors in one process (for export): ``(stats[stat][fqn] flat, counts, meta)``."""
    path = Path(path)
    _metadata(path)
    verify_dir(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fisher.pt")
        try:
            dcp_to_torch_save(str(path), out)
        except (Exception, DCPException) as e:
            raise CheckpointError(f"{path}: failed to read the checkpoint's shard files {_shards(path)} ({_first_line(e)})") from None
        full = torch.load(out, weights_only=False)[KEY]
    meta = full["meta"]
    meta = json.loads(meta.decode() if isinstance(meta, bytes) else meta)
    counts = {k: float(v) for k, v in full["counts"].items()}
    return full["stats"], counts, meta
