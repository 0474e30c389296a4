"""A method is a list of named stages that hand over files under ``out``; this runs them.

A stage is a function of the run's context (config, process group, tokenizer, output folder), never of
the method's other stages, so stages import no recipe object and a cluster job can run any one of them
alone on the previous stage's files. Every rank runs every stage; a barrier after each one means rank 0's
files exist before any rank reads them in the next.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from fisherdist.distributed.collectives import DTYPES, barrier
from fisherdist.errors import FisherdistError
from fisherdist.metrics import MetricsLogger
from fisherdist.recipes.config import RunConfig

C = TypeVar("C", bound=RunConfig)
ALL = "run"


@dataclass
class RunContext(Generic[C]):
    """What every stage of one invocation shares; ``state`` carries objects from one stage to the next
    in the same process (e.g. the wrapped training model), each stage reloading them from files otherwise."""

    cfg: C
    env: Any
    tokenizer: Any
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.env.rank)

    @property
    def world(self) -> int:
        return int(self.env.world_size)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.model.dtype]

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    def log(self, text: str) -> None:
        if self.rank == 0:
            from rich.console import Console

            Console().print(text)

    @property
    def metrics(self) -> MetricsLogger:
        """The run's logger (``out/metrics.jsonl`` and the ``log:`` sinks), shared by every stage of this
        invocation; it appends, so a stage run alone or a resumed run adds to the earlier rows."""
        if "metrics" not in self.state:
            self.state["metrics"] = MetricsLogger(self.out, self.cfg.log, config=self.cfg.model_dump(mode="json"),
                                                  resume=True)
        logger: MetricsLogger = self.state["metrics"]
        return logger

    def close(self) -> None:
        """Flush and close the metrics sinks (TensorBoard, W&B)."""
        logger = self.state.pop("metrics", None)
        if logger is not None:
            logger.close()

    def write_json(self, name: str, value: Any) -> None:
        """``out/name`` written by rank 0."""
        if self.rank == 0:
            (self.out / name).write_text(json.dumps(value, indent=1))


def open_run(cfg: C, config_text: str) -> RunContext[C]:
    """Join the process group, create ``out`` with the resolved ``config.yaml``, load the tokenizer."""
    from fisherdist.distributed.env import init_distributed

    dist_cfg = getattr(cfg, "dist", None)
    env = init_distributed(timeout_s=dist_cfg.timeout_s if dist_cfg is not None else None)
    if env.rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.yaml").write_text(config_text)
    barrier()
    return RunContext(cfg, env, _tokenizer(cfg.model.path))


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FisherdistError(f"model.path: no tokenizer in {path} ({e})") from None


Stage = Callable[[RunContext[Any]], None]


class StageRegistry:
    """The ordered stages of one method; ``run`` stands for all of them in order."""

    def __init__(self, method: str, stages: Sequence[tuple[str, Stage]]) -> None:
        self.method = method
        self._stages: dict[str, Stage] = dict(stages)

    @property
    def names(self) -> list[str]:
        return list(self._stages)

    def help(self, name: str) -> str:
        """CLI help of a stage: the first line of its docstring."""
        if name == ALL:
            return f"every stage in order: {', '.join(self.names)}"
        return (self._stages[name].__doc__ or name).strip().splitlines()[0]

    def resolve(self, names: Sequence[str]) -> list[str]:
        if ALL in names:
            return self.names
        unknown = [n for n in names if n not in self._stages]
        if unknown:
            raise FisherdistError(f"{self.method}: unknown stage {unknown[0]!r} (expected one of "
                                  f"{', '.join(self.names)}, {ALL})")
        return list(names)

    def run(self, ctx: RunContext[Any], names: Sequence[str]) -> dict[str, float]:
        """Run ``names`` (or ``run``: all) in order; rank 0 writes ``out/timings.json``."""
        timings: dict[str, float] = {}
        try:
            for name in self.resolve(names):
                start = time.perf_counter()
                self._stages[name](ctx)
                barrier()
                timings[name] = round(time.perf_counter() - start, 1)
                ctx.log(f"[green]done[/] {name} in {timings[name]} s")
        finally:
            ctx.close()
        ctx.write_json("timings.json", timings)
        return timings
