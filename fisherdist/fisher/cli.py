"""``fisherdist fisher CONFIG [key=value ...]`` (a standalone estimation run) and ``fisherdist export``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import Field, model_validator

from fisherdist.config import (
    DataConfig,
    DistConfig,
    ModelConfig,
    Section,
    check_model_backend,
    dump_config,
    load_config,
)
from fisherdist.fisher.spec import FisherSpec


class FisherRunConfig(Section):
    """Schema of ``configs/fisher/*.yaml``."""

    model: ModelConfig
    data: DataConfig
    fisher: FisherSpec = Field(default_factory=FisherSpec)
    dist: DistConfig = Field(default_factory=DistConfig)
    out: str = Field(description="output directory: fisher/ (DCP state), summary.json, config.yaml")
    checkpoint_every: int = Field(0, ge=0, description="save the state every N micro-batch steps (0: only at the end)")
    resume: bool = Field(True, description="continue from out/fisher if it exists (adds to its counts)")

    @model_validator(mode="after")
    def _load_fits_backend(self) -> FisherRunConfig:
        check_model_backend(self.model, self.dist)
        return self


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(FisherRunConfig, args.config, args.overrides)
    from fisherdist.distributed.runlock import run_lock
    from fisherdist.distributed.spawn import maybe_spawn

    with run_lock(cfg.out):  # one live run per out (dist.nproc workers run under the launcher's lock)
        code = maybe_spawn(cfg.dist.nproc, ["fisher", args.config, *args.overrides])
        if code is not None:
            return code
        from fisherdist.fisher.estimate_run import run_fisher

        return run_fisher(cfg, dump_config(cfg))


def _export(args: argparse.Namespace) -> int:
    from fisherdist.fisher.export import export_safetensors

    path = export_safetensors(Path(args.dir), Path(args.out), summary=args.summary)
    print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fisher", help="estimate a sharded Fisher over a dataset (configs/fisher/tiny.yaml)")
    p.add_argument("config", help="YAML config (see configs/fisher/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. dist.backend=fsdp2 dist.nproc=2")
    p.set_defaults(func=_run)
    e = sub.add_parser("export", help="write a Fisher checkpoint as one float32 tensor per parameter (safetensors)")
    e.add_argument("dir", help="a run's out/ directory or its out/fisher checkpoint")
    e.add_argument("--out", required=True, help="FILE.safetensors")
    e.add_argument("--summary", action="store_true",
                   help="write per-matrix row sums, column sums and totals (<name>.row/.col/.total) instead")
    e.set_defaults(func=_export)


