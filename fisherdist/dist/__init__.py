"""Deprecated alias of :mod:`fisherdist.distributed` (renamed in 0.2; this alias goes in the next release).

``import fisherdist.dist.wrap`` and ``python -m fisherdist.dist.preempt`` (in users' sbatch scripts) keep
working: every ``fisherdist.dist.X`` resolves to the one ``fisherdist.distributed.X`` module object, so
classes compare equal whichever name imported them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

from fisherdist.distributed import *  # noqa: F403 - the package's own names, as before
from fisherdist.distributed import __all__  # noqa: F401

_OLD, _NEW = __name__, "fisherdist.distributed"

warnings.warn(f"{_OLD} is deprecated: use {_NEW}", DeprecationWarning, stacklevel=2)


class _AliasLoader(importlib.abc.Loader):
    """Hands out the real module (``import``) or its code (``python -m``, which runs it as ``__main__``)."""

    def __init__(self, real_name: str) -> None:
        self.real_name = real_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.real_name)

    def exec_module(self, module: ModuleType) -> None:
        """The real module ran when it was imported."""

    def get_code(self, fullname: str) -> CodeType | None:
        spec = importlib.util.find_spec(self.real_name)
        assert spec is not None and isinstance(spec.loader, importlib.abc.InspectLoader)
        return spec.loader.get_code(self.real_name)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_OLD + "."):
            return None
        real_name = _NEW + fullname[len(_OLD):]
        if importlib.util.find_spec(real_name) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real_name))


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
