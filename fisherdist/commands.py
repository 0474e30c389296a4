"""The one "load config -> preflight -> spawn -> run" path behind every config-driven command.

A command validates its YAML (so bad input fails once, in the parent, before anything spawns), runs the
preflight (outputs writable, an existing ``out`` holding a run of this command or nothing, JSONL inputs
decoding, model files complete, plus the command's own check such as a compatible state to resume), then
either re-launches itself on ``nproc`` local processes (outside torchrun / srun) or runs in this process,
holding ``out``'s run lock (:mod:`fisherdist.distributed.runlock`) throughout. A run that fails takes back
the ``out/config.yaml`` (and the empty ``out``) it created.
It sits beside :mod:`fisherdist.config`, below every layer, so the Fisher engine's CLI, the evaluation CLI
and the method recipes all share it without importing upward.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

from fisherdist.config import ModelConfig, dump_config, load_config
from fisherdist.errors import ConfigError

C = TypeVar("C", bound=BaseModel)
Run = Callable[[C, str], "int | None"]
Preflight = Callable[[C], None]
KEEP_EXITS = (0, 75)  # success, and a planned stop (PREEMPTED_EXIT) whose out a rerun continues


def dist_nproc(cfg: Any) -> int:
    """Processes a config asks for: ``dist.nproc`` (most commands), a top-level ``nproc``, else one."""
    dist = getattr(cfg, "dist", None)
    return int(dist.nproc if dist is not None else getattr(cfg, "nproc", 1))


# ---- preflight --------------------------------------------------------------------------------------
def check_writable(path: str | Path, key: str, *, is_dir: bool = True) -> None:
    """``path`` can be created (or exists as the right kind) and written: one line otherwise, in seconds."""
    p = Path(path).absolute()
    if p.exists() and p.is_dir() != is_dir:
        raise ConfigError(f"{key}={path}: exists and is {'not ' if is_dir else ''}a directory")
    probe_in = p if p.is_dir() else p.parent
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ConfigError(f"{key}={path}: cannot be created ({probe_in} is a file, not a directory)")
    try:
        with tempfile.TemporaryFile(dir=probe_in, prefix=".fisherdist-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={path}: not writable ({probe_in}: {e.strerror or e})") from None


def check_out(out: Path, schema: type[BaseModel]) -> None:
    """``out`` is writable and holds nothing, or a run of this command (its ``config.yaml`` fits ``schema``)."""
    check_writable(out, "out")
    saved = out / "config.yaml"
    if not saved.is_file():
        return
    try:
        tree = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{saved}: unreadable ({type(e).__name__}); not a fisherdist run, use another out") from None
    foreign = sorted(set(tree) - set(schema.model_fields)) if isinstance(tree, dict) else ["<not a mapping>"]
    if foreign:
        raise ConfigError(f"out={out}: holds a run of another command ({saved} has key '{foreign[0]}' that this "
                          "command does not know); use another out")


def _leaves(node: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every setting, sub-sections included (model sections as themselves)."""
    for name in type(node).model_fields:
        value, key = getattr(node, name), f"{prefix}{name}"
        yield key, value
        if isinstance(value, BaseModel):
            yield from _leaves(value, f"{key}.")


def check_inputs(cfg: BaseModel) -> None:
    """Every JSONL input decodes (UTF-8, one JSON object a line) and every model's weights are complete."""
    from fisherdist.data.jsonl import check_jsonl
    from fisherdist.integrity import check_model_dir

    for _key, value in _leaves(cfg):
        if isinstance(value, ModelConfig):
            check_model_dir(value.path)
        elif isinstance(value, str) and value.endswith(".jsonl") and Path(value).is_file():
            check_jsonl(value)


# ---- run ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _take_back_on_failure(out: Path | None, code: list[int]) -> Iterator[None]:
    """Remove the ``out/config.yaml`` (and empty ``out``) that a failed run created; keep everything else."""
    from fisherdist.distributed.runlock import holds_lock

    if out is None or not holds_lock():
        yield
        return
    had_out, had_config = out.exists(), (out / "config.yaml").exists()
    try:
        yield
    finally:
        if code[0] not in KEEP_EXITS:
            if not had_config:
                (out / "config.yaml").unlink(missing_ok=True)
            if not had_out and out.is_dir() and not any(out.iterdir()):
                out.rmdir()


def launch(schema: type[C], config: str | Path | None, overrides: Sequence[str], argv: Sequence[str],
           run: Run[C], preflight: Preflight[C] | None = None) -> int:
    """Validate ``config`` + ``overrides`` and run the preflight, then spawn ``fisherdist ARGV`` when the
    config asks for more processes than this one, else ``run(cfg, resolved_yaml)``; returns the exit status."""
    from fisherdist.distributed.runlock import run_lock, under_parent_launch
    from fisherdist.distributed.spawn import maybe_spawn

    cfg = load_config(schema, config, list(overrides))
    out = Path(cfg.out) if getattr(cfg, "out", None) is not None else None  # type: ignore[attr-defined]
    if not under_parent_launch():  # the launcher checked already; its workers go straight to work
        if out is not None:
            check_out(out, schema)
        check_inputs(cfg)
        if preflight is not None:
            preflight(cfg)
    code = [1]
    with _take_back_on_failure(out, code), run_lock(out) if out is not None else contextlib.nullcontext():
        spawned = maybe_spawn(dist_nproc(cfg), list(argv))
        code[0] = spawned if spawned is not None else int(run(cfg, dump_config(cfg)) or 0)
    return code[0]


def config_command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, schema: type[C], run: Run[C], *, help: str,
                   config_help: str, example: str, argv_head: Sequence[str] | None = None,
                   preflight: Preflight[C] | None = None) -> argparse.ArgumentParser:
    """``NAME CONFIG [key=value ...]`` running :func:`launch`; ``argv_head`` is how the command names
    itself when it re-launches (default ``[name]``; nested commands give their full path)."""
    head = list(argv_head) if argv_head is not None else [name]
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")

    def _func(args: argparse.Namespace) -> int:
        return launch(schema, args.config, args.overrides, [*head, args.config, *args.overrides], run, preflight)

    p.set_defaults(func=_func)
    return p
