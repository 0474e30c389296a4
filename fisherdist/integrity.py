"""Integrity of what we write and read back: one manifest format, one set of checks, one-line errors.

Every directory fisherdist writes for later reading (Fisher states, method states, adapters, merged and
base-copy models) gets ``MANIFEST.json`` as its LAST file: size and SHA-256 of every other file, plus the
settings that define what the state means. A reader verifies it before using a byte, so a flipped byte, a
truncated or missing shard is one :class:`IntegrityError` line naming the file (exit 2) instead of silently
wrong numbers. A user's own model directory has no manifest; it is accepted once its safetensors headers
and sizes check out (:func:`check_model_dir`). Run checkpoints (``step-N/run.json``) use the same hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fisherdist.errors import CheckpointError

MANIFEST = "MANIFEST.json"
FORMAT = "fisherdist-manifest/1"
FileTable = dict[str, dict[str, Any]]


class IntegrityError(CheckpointError):
    """A written state or model file that is missing, truncated or differs from its manifest."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    """Every regular file below ``directory`` except the manifest (symlinked folders are not followed)."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_files(directory: Path, keep: Callable[[Path], bool] = lambda p: True) -> FileTable:
    """``{relative path: {bytes, sha256}}`` of the files under ``directory`` that ``keep`` selects."""
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in _files(directory) if keep(p)}


def write_manifest(directory: str | Path, files: FileTable | None = None, settings: Mapping[str, Any] | None = None) -> Path:
    """Write ``MANIFEST.json`` last (temp file + rename); ``files`` defaults to hashing the directory."""
    d = Path(directory)
    table = hash_files(d) if files is None else files
    body = {"format": FORMAT, "files": dict(sorted(table.items())), "settings": dict(settings or {})}
    tmp = d / f".{MANIFEST}.tmp"
    with tmp.open("w") as f:
        f.write(json.dumps(body, indent=1, default=str))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(d / MANIFEST)
    return d / MANIFEST


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of ``directory``, ``None`` when it has none, an error line when it is unreadable."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(body, dict) or not isinstance(body.get("files"), dict):
        raise IntegrityError(f"{path}: not a fisherdist manifest (no 'files' table)")
    return body


def check_file(path: Path, want: Mapping[str, Any], hashes: bool = True) -> None:
    """One file against its manifest row: present, same size, same SHA-256."""
    if not path.is_file():
        raise IntegrityError(f"{path}: missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != int(want["bytes"]):
        raise IntegrityError(f"{path}: {size} bytes, {MANIFEST} recorded {want['bytes']} (truncated or replaced)")
    if hashes and sha256(path) != want["sha256"]:
        raise IntegrityError(f"{path}: corrupted (SHA-256 differs from the one recorded in {MANIFEST})")


def verify_dir(directory: str | Path, hashes: bool = True) -> dict[str, Any] | None:
    """Check every file listed in the manifest; returns the manifest (``None``: the directory has none)."""
    d = Path(directory)
    body = read_manifest(d)
    if body is None:
        return None
    for name, want in body["files"].items():
        check_file(d / name, want, hashes)
    return body


# ---- user model directories (no manifest) -----------------------------------------------------------
def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose size covers every tensor the header lists."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise IntegrityError(f"{path}: not a complete safetensors file ({size} bytes, header unreadable)")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError):
            raise IntegrityError(f"{path}: safetensors header is not valid (corrupted)") from None
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise IntegrityError(f"{path}: truncated ({size} bytes, its header needs {need})")


def _indexed_shards(directory: Path) -> list[Path]:
    """Shards named by a ``*.safetensors.index.json`` (a missing one is an error), else the files present."""
    shards = set(directory.glob("*.safetensors"))
    for index in directory.glob("*.safetensors.index.json"):
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{index}: unreadable weight index ({e})") from None
        shards |= {directory / n for n in names}
    return sorted(shards)


_checked: set[tuple[Any, ...]] = set()


def _fingerprint(d: Path) -> tuple[Any, ...]:
    """Names, sizes and mtimes of a directory's files: a model checked once is not re-hashed per load."""
    return (str(d.resolve()), *sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir() if p.is_file()))


def check_model_dir(directory: str | Path, hashes: bool | None = None) -> None:
    """Our model directories: the manifest. Users' directories: every safetensors header and size.
    By default one process per node (``LOCAL_RANK`` 0) reads and hashes; the others check sizes."""
    d = Path(directory)
    key = _fingerprint(d)
    if key not in _checked:
        _check_model_dir(d, os.environ.get("LOCAL_RANK", "0") == "0" if hashes is None else hashes)
        _checked.add(key)


def _check_model_dir(d: Path, hashes: bool) -> None:
    if verify_dir(d, hashes) is not None:
        return
    for shard in _indexed_shards(d):
        if not shard.is_file():
            raise IntegrityError(f"{shard}: missing (named by the model's weight index)")
        check_safetensors(shard)
    if not _indexed_shards(d) and not any(d.glob("*.bin")) and not any(d.glob("*.pt")):
        raise IntegrityError(f"{d}: no model weights (expected model.safetensors)")


# ---- settings that define a state -------------------------------------------------------------------
def check_settings(where: str | Path, saved: Mapping[str, Any], current: Mapping[str, Any], hint: str) -> None:
    """Refuse to add to a state computed with other settings: one line naming the key and both values."""
    for key in sorted(set(saved) | set(current)):
        if key in saved and key in current and saved[key] != current[key]:
            raise CheckpointError(f"{where}: was computed with {key}={saved[key]!r}, this run has "
                                  f"{key}={current[key]!r} ({hint})")


def content_hash(path: str | Path) -> str:
    """Short SHA-256 of a data reference: a resume notices data that changed under the same name. A file is
    hashed whole; a dataset directory by its files' names, sizes and times (cheap at corpus scale); a hub
    dataset id by the reference itself (its cached revision is ``datasets``' business)."""
    from fisherdist.data.source import parse_ref

    local = parse_ref(path).path
    if local.is_file():
        return sha256(local)[:16]
    if local.is_dir():
        listing = sorted((str(f.relative_to(local)), f.stat().st_size, f.stat().st_mtime_ns)
                         for f in local.rglob("*") if f.is_file())
        return hashlib.sha256(repr(listing).encode()).hexdigest()[:16]
    return hashlib.sha256(str(path).encode()).hexdigest()[:16]


def model_identity(directory: str | Path) -> str:
    """Short hash of a model's config and weight headers (cheap, no weights read): same model or not."""
    d = Path(directory)
    h = hashlib.sha256((d / "config.json").read_bytes() if (d / "config.json").is_file() else b"")
    for shard in sorted(d.glob("*.safetensors")):
        with shard.open("rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            h.update(shard.name.encode() + f.read(min(n, 1 << 24)))
    return h.hexdigest()[:16]


def resume_from(path: str | Path, exists: bool, mode: str, settings: Mapping[str, Any], what: str) -> bool:
    """Whether a run with ``resume: mode`` continues the state at ``path`` (verified, and computed with the
    same ``settings``); ``must`` without a state and an incompatible state are one-line errors."""
    if not exists:
        if mode == "must":
            raise CheckpointError(f"{path}: resume=must, but there is no {what} to continue")
        return False
    if mode == "never":
        return False
    body = verify_dir(path)
    if body is not None:
        check_settings(path, body.get("settings", {}), settings, "resume=never starts over; or use another out")
    return True
