"""``FisherCallback``: the sharded Fisher of a ``transformers.Trainer`` run (or a TRL trainer built on it).

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[FisherCallback(spec=FisherSpec(params=["*mlp*"]), save_dir="fisher_out")])

Statistics are gathered with the engine's backend for whatever the Trainer prepared (DeepSpeed ZeRO-1/2/3,
FSDP2 through accelerate's ``fsdp_config``, DDP, one process), in the gradient's sharding, and follow the
mean convention whatever loss averaging the Trainer uses (see :mod:`fisherdist.integrations.capture`).
The state is saved in ``checkpoint-N/fisher/`` with every Trainer checkpoint, loaded again when training
resumes from one, and written to ``save_dir/fisher`` at the end (``fisherdist export save_dir`` reads it).

Importing this module on a machine without CUDA turns off DeepSpeed's JIT-built CPU shared-memory op
(:func:`~fisherdist.distributed.wrap_deepspeed.skip_cpu_shm_op`): accelerate starts DeepSpeed's comm layer
later (in ``TrainingArguments`` or ``deepspeed.initialize``), without fisherdist's wrapper.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from fisherdist.atomic import write_text
from fisherdist.distributed.collectives import is_main
from fisherdist.distributed.wrap_deepspeed import skip_cpu_shm_op
from fisherdist.errors import CheckpointError
from fisherdist.fisher.checkpoint import load_fisher, save_fisher
from fisherdist.fisher.spec import FisherSpec
from fisherdist.integrations.capture import FisherTracker

#: the Trainer's checkpoint folder prefix (``transformers.trainer_utils.PREFIX_CHECKPOINT_DIR``)
CHECKPOINT_PREFIX = "checkpoint"


if importlib.util.find_spec("deepspeed") is not None:
    with contextlib.suppress(ImportError):  # a broken DeepSpeed install only matters to its users
        skip_cpu_shm_op()


class FisherCallback(TrainerCallback):
    """Accumulate ``spec`` during training; ``resume_from``: a Fisher checkpoint to load when the Trainer
    resumes from a checkpoint outside ``output_dir`` (default: ``output_dir/checkpoint-<step>/fisher``)."""

    def __init__(self, spec: FisherSpec | None = None, save_dir: str | Path | None = None, *,
                 resume_from: str | Path | None = None) -> None:
        self.spec = spec or FisherSpec()
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.tracker: FisherTracker | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.close()
        self.tracker = FisherTracker(model, self.spec)
        if state.global_step > 0:  # the Trainer resumed from a checkpoint: so does the Fisher
            load_fisher(self.tracker.acc.state, self._resume_path(args, state))

    def _resume_path(self, args: TrainingArguments, state: TrainerState) -> Path:
        path = self.resume_from or Path(str(args.output_dir)) / f"{CHECKPOINT_PREFIX}-{state.global_step}" / "fisher"
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"FisherCallback: the Trainer resumed at step {state.global_step} but {path} holds "
                                  "no Fisher state; pass FisherCallback(resume_from=<checkpoint>/fisher)")
        return path

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.end_micro_batch(optimizer_step=False)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.end_micro_batch(optimizer_step=True)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.check()
            ckpt = Path(str(args.output_dir)) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
            save_fisher(self.tracker.acc.state, ckpt / "fisher")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.tracker is None:
            return
        self.tracker.end_micro_batch()
        self.tracker.check()
        if self.save_dir is not None:
            save_fisher(self.tracker.acc.state, self.save_dir / "fisher")
            counts = self.tracker.acc.state.global_counts()
            if is_main():
                write_text(self.save_dir / "summary.json",
                                  json.dumps({"counts": counts, "spec": self.spec.model_dump()}, indent=1))
        self.tracker.close()
        self.tracker = None
