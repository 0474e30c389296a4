"""``fisherdist fisher CONFIG [key=value ...]`` (a standalone estimation run) and ``fisherdist export``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from fisherdist.commands import config_command
from fisherdist.config import DataConfig, DistConfig, ModelConfig, ResumeMode, Section, check_model_backend
from fisherdist.fisher.spec import FisherSpec
from fisherdist.metrics import LogSettings


class FisherRunConfig(Section):
    """Schema of ``configs/fisher/*.yaml``."""

    model: ModelConfig
    data: DataConfig
    fisher: FisherSpec = Field(default_factory=FisherSpec)
    dist: DistConfig = Field(default_factory=DistConfig)
    out: str = Field(description="output directory: fisher/ (DCP state), summary.json, config.yaml")
    checkpoint_every: int = Field(0, ge=0, description="save the state every N micro-batch steps (0: only at the end)")
    resume: ResumeMode = Field("auto", description="auto: continue a compatible out/fisher (adds to its counts); "
                               "never: start over; must: fail without a state to continue")
    log: LogSettings = Field(default_factory=LogSettings, description="metrics.jsonl, TensorBoard, W&B sinks")

    @model_validator(mode="after")
    def _load_fits_backend(self) -> FisherRunConfig:
        check_model_backend(self.model, self.dist)
        return self


def state_settings(cfg: FisherRunConfig) -> dict[str, Any]:
    """What a Fisher state means: a resume with any of these changed would add up different quantities.
    ``data.num_samples`` is not one: a (shuffled) prefix of the same records extends or ends the same run."""
    from fisherdist.integrity import content_hash, model_identity

    d, f = cfg.data, cfg.fisher
    return {"model.identity": model_identity(cfg.model.path), "model.dtype": cfg.model.dtype, "data.path": d.path,
            "data.sha256": content_hash(d.path), "data.field": d.field, "data.max_length": d.max_length,
            "data.shuffle": d.shuffle, "data.seed": d.seed, "fisher.estimator": f.estimator,
            "fisher.granularity": f.granularity, "fisher.params": list(f.params),
            "fisher.token_weighted": f.token_weighted, "fisher.mc_samples": f.mc_samples}


def resume_state(cfg: FisherRunConfig) -> bool:
    """Whether this run continues ``out/fisher`` (verified, same settings), per ``resume``."""
    from fisherdist.integrity import resume_from

    ckpt = Path(cfg.out) / "fisher"
    return resume_from(ckpt, (ckpt / ".metadata").is_file(), cfg.resume, state_settings(cfg), "Fisher state")


def _preflight(cfg: FisherRunConfig) -> None:
    resume_state(cfg)


def _run(cfg: FisherRunConfig, config_text: str) -> int:
    from fisherdist.fisher.estimate_run import run_fisher

    return run_fisher(cfg, config_text)


def _export(args: argparse.Namespace) -> int:
    from fisherdist.commands import check_writable
    from fisherdist.fisher.export import export_safetensors

    check_writable(args.out, "--out", is_dir=False)
    path = export_safetensors(Path(args.dir), Path(args.out), summary=args.summary)
    print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config_command(sub, "fisher", FisherRunConfig, _run, help="estimate a sharded Fisher over a dataset (configs/fisher/tiny.yaml)",
                   config_help="YAML config (see configs/fisher/)", example="dist.backend=fsdp2 dist.nproc=2",
                   preflight=_preflight)
    e = sub.add_parser("export", help="write a Fisher checkpoint as one float32 tensor per parameter (safetensors)")
    e.add_argument("dir", help="a run's out/ directory or its out/fisher checkpoint")
    e.add_argument("--out", required=True, help="FILE.safetensors")
    e.add_argument("--summary", action="store_true",
                   help="write per-matrix row sums, column sums and totals (<name>.row/.col/.total) instead")
    e.set_defaults(func=_export)
