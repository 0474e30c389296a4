"""Directory writes that an interruption cannot half-finish: write a hidden sibling, then swap it in.

The previous directory (if any) is renamed aside before the new one takes its name and deleted only after,
so at every instant either the old or the new complete directory sits at the final path.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; swap it in on success, delete it on error."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, final)


def write_text(final: str | Path, text: str) -> Path:
    """Write a file through a hidden sibling and an atomic rename: readers see the old or the new file."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.write_text(text)
    tmp.replace(final)
    return final
