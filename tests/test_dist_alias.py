"""``fisherdist.dist`` (the old name of :mod:`fisherdist.distributed`) keeps users' imports and sbatch lines
working for one release, with a DeprecationWarning, and hands out the very same module objects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_old_imports_are_the_new_modules() -> None:
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import fisherdist.dist\nexcept DeprecationWarning as w:\n    print('warned:', w)\n"
            "warnings.simplefilter('ignore')\n"
            "import fisherdist.dist.wrap as old, fisherdist.distributed.wrap as new\n"
            "from fisherdist.dist import init_distributed\n"
            "from fisherdist.distributed.env import init_distributed as real\n"
            "print(old is new, old.Wrapped is new.Wrapped, init_distributed is real)")
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["warned: fisherdist.dist is deprecated: use fisherdist.distributed",
                                        "True True True"]


def test_old_module_path_runs_as_main() -> None:
    old, new = _python("-m", "fisherdist.dist.preempt"), _python("-m", "fisherdist.distributed.preempt")
    assert new.returncode != 0 and "usage: python -m fisherdist.distributed.preempt" in new.stderr + new.stdout
    assert (old.returncode, old.stdout) == (new.returncode, new.stdout)
    assert "usage: python -m fisherdist.distributed.preempt" in old.stderr
