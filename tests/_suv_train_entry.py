"""SUV training on the shared trainer as a command, for the resume / preemption tests.

``python -m tests._suv_train_entry --out DIR --backend fsdp2|zero3|none [--signal-at S] [--sleep T]``

The model, Fisher barrier, pairs and settings of ``tests/test_suv_train.py`` (7 pairs: a ragged last step;
projection and an adaptive lambda, so hook state is checkpointed). Checkpoints go to ``DIR/ckpt``.
``--signal-at S`` makes rank 0 send itself SIGTERM during step S (one rank only, on purpose) and write the
time to ``DIR/signalled``;
with either option each rank writes its last finished step to ``DIR/done-rank<r>``. At the end rank 0 writes ``DIR/result.pt`` (per-step log and adapter weights).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from tests.entry import finish, run_and_exit

SETTINGS = dict(lr=5e-3, epochs=3, lam=0.05, lambda_schedule="adaptive", projection=True, max_grad_norm=1.0, seed=3,
                max_length=24, batch_size=2, retain_batch_size=1, checkpoint_every=None, checkpoint_minutes=None)


class SignalAt:
    """A hook that signals this process once, during step ``at`` (rank 0 only)."""

    name = "signal"

    def __init__(self, at: int, out: Path, sleep: float) -> None:
        self.at, self.out, self.sleep = at, out, sleep

    def before_loss(self, batch: Any) -> None:
        time.sleep(self.sleep)

    def extra_loss(self, batch: Any) -> None:
        return None

    def extra_grads(self, batch: Any) -> dict:
        return {}

    def after_backward(self, batch: Any) -> None:
        if batch.step == self.at and int(os.environ.get("RANK", "0")) == 0:
            (self.out / "signalled").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGTERM)

    def after_step(self, batch: Any, row: dict) -> None:
        (self.out / f"done-rank{os.environ.get('RANK', '0')}").write_text(str(batch.step))


def train(backend: str, out: Path | None, signal_at: int = -1, sleep: float = 0.0, **overrides: Any) -> dict:
    """One run (fresh, or resumed from ``out/ckpt``); returns ``{history, weights}``."""
    from fisherdist.distributed.collectives import rank_world
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.fisher.layout import Placement
    from fisherdist.methods.suv.config import TrainSettings
    from fisherdist.methods.suv.train import SuvTrainer
    from tests.fisher_oracle import model_dtype
    from tests.test_suv_regularizer import barrier_for, random_fishers, tiny_peft
    from tests.test_suv_train import make_data

    rank, world = rank_world()
    model = tiny_peft().to(model_dtype(backend))
    fishers = random_fishers(model)
    settings = TrainSettings(**{**SETTINGS, **overrides})
    options = {"zero_config": {"gradient_clipping": settings.max_grad_norm}} if backend.startswith("zero") else {}
    w = wrap_model(model, backend, optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=settings.lr), **options)
    rows = backend in ("fsdp2", "none")
    placement = (lambda s: Placement.rows(s, rank, world)) if rows else (lambda s: Placement.flat_chunks(s, rank, world))
    pairs, retain = make_data()
    trainer = SuvTrainer(w, pairs, retain, settings, pad_id=0, barrier=barrier_for(w.unwrapped, fishers, placement),
                         checkpoint_dir=out / "ckpt" if out is not None else None)
    if signal_at > 0 or sleep:
        assert out is not None
        trainer.trainer.hooks.insert(0, SignalAt(signal_at, out, sleep))  # type: ignore[arg-type]
    history = trainer.run(progress=False)
    return {"history": history, "weights": w.gather_trainable()}


def main(argv: list[str]) -> int:
    from fisherdist.distributed.env import init_distributed, teardown
    from fisherdist.recipes.trainer import TrainingPreempted

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", default="fsdp2", choices=["fsdp2", "zero3", "none"])
    p.add_argument("--signal-at", type=int, default=-1)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--ckpt-every", type=int, default=None)
    args = p.parse_args(argv)
    env = init_distributed(require_group=args.backend != "none")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pid-rank{env.rank}").write_text(str(os.getpid()))
    try:
        result = train(args.backend, args.out, args.signal_at, args.sleep, checkpoint_every=args.ckpt_every)
    except TrainingPreempted as stop:
        teardown()
        return int(stop.code)  # type: ignore[arg-type]
    return finish(result, args.out, env.rank)


if __name__ == "__main__":
    run_and_exit(main)
