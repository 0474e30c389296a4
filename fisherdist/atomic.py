"""Directory writes that an interruption cannot half-finish: write a hidden sibling, then swap it in.

The previous directory (if any) is renamed aside before the new one takes its name and deleted only after,
so at every instant either the old or the new complete directory sits at the final path. Directories get
their integrity manifest (:mod:`fisherdist.integrity`) as the last file before the swap.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fisherdist.integrity import write_manifest


def remove(path: Path) -> None:
    """Delete a directory tree, or just the link when ``path`` is a symlink (never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def swap_in(tmp: Path, final: Path) -> Path:
    """Rename ``tmp`` to ``final``, replacing an existing ``final`` without a moment where neither exists."""
    old = final.with_name(f".{final.name}.old")
    remove(old)
    if final.exists() or final.is_symlink():
        final.rename(old)
    tmp.rename(final)
    remove(old)
    return final


@contextmanager
def atomic_dir(final: str | Path, settings: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success write its manifest (sizes, SHA-256 and
    ``settings``) and swap it in; on error delete it."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):  # outputs are 0644 under the umask (some writers create 0600 files)
        if f.is_file() and not f.is_symlink():
            f.chmod(_file_mode())
    write_manifest(tmp, settings=settings)
    swap_in(tmp, final)


def write_text(final: str | Path, text: str) -> Path:
    """Write a file through a hidden sibling and an atomic rename: readers see the old or the new file."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.write_text(text)
    tmp.replace(final)
    return final


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish_file(tmp: Path, final: Path) -> Path:
    """Rename a finished temp file into place with the usual output mode (0644 under the umask;
    writers such as safetensors create their files 0600)."""
    tmp.chmod(_file_mode())
    tmp.replace(final)
    return final
