"""The SUV pipeline: mine -> prefs -> fisher -> train (+ export) -> eval, as stages that hand over files.

Files under ``out``: ``mined.jsonl``, ``prefs.jsonl`` (stages 1-2), ``fisher_{forbidden,retain}/`` (DCP),
``train_log.json``, ``models/{base,adapter,unlearned}/``, ``protected.jsonl``, ``report.json`` /
``report.png``. Every rank runs every stage; rank 0 writes the files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fisherdist.distributed.collectives import DTYPES, barrier
from fisherdist.errors import FisherdistError
from fisherdist.methods.suv.config import SuvConfig

ALL_STAGES = ["mine", "prefs", "fisher", "train", "eval"]


class SuvRecipe:
    """State shared by the stages of one invocation (the model is loaded and wrapped once)."""

    def __init__(self, cfg: SuvConfig, config_text: str) -> None:
        from fisherdist.distributed.env import init_distributed

        self.cfg, self.env = cfg, init_distributed()
        self.rank, self.world = self.env.rank, self.env.world_size
        self.out = Path(cfg.out)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(config_text)
        barrier()
        self.dtype = DTYPES[cfg.model.dtype]
        self.tokenizer = _tokenizer(cfg.model.path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.wrapped: Any = None
        self.barrier = None
        self.timings: dict[str, float] = {}

    def log(self, text: str) -> None:
        if self.rank == 0:
            from rich.console import Console

            Console().print(text)

    # -- stage 3: Fisher ----------------------------------------------------------------------------
    def _wrap(self) -> Any:
        """Base model + fresh LoRA (B = 0), wrapped for the backend, with the optimizer."""
        if self.wrapped is None:
            from fisherdist.models.peft_utils import apply_lora
            from fisherdist.models.sharded_load import load_wrapped

            t, m = self.cfg.train, self.cfg.model
            opt = lambda ps: torch.optim.AdamW(ps, lr=t.lr, weight_decay=t.weight_decay)  # noqa: E731
            self.wrapped = load_wrapped(m.path, self.dtype, self.cfg.dist.backend, self.env.device, load=m.load,
                                        prepare=lambda base: apply_lora(base, self.cfg.lora), optimizer_factory=opt,
                                        seed=t.seed, **self.cfg.backend_options())
        return self.wrapped

    def pairs(self) -> list:
        from fisherdist.methods.suv.stages import load_pairs

        return load_pairs(self.out / "prefs.jsonl", self.tokenizer, self.cfg.train.max_length)

    def fisher(self) -> None:
        from fisherdist.data.batches import load_texts, tokenize
        from fisherdist.methods.suv.fisher_pass import compute_and_save

        fs = self.cfg.fisher
        pairs = self.pairs()[: fs.forbid_samples]
        forbid = [p.prompt + p.rejected for p in pairs]
        retain = tokenize(load_texts(self.cfg.data.retain, self.cfg.data.text_field, fs.retain_samples),
                          self.tokenizer, fs.max_length)
        self.log(f"[bold]fisher[/]: {len(forbid)} forbidden and {len(retain)} retain samples")
        self.barrier = compute_and_save(self._wrap(), forbid, retain, fs, self.cfg.lora, self.pad_id, self.out)

    # -- stage 4: training + export -----------------------------------------------------------------
    def train(self) -> None:
        from fisherdist.data.batches import load_texts, tokenize
        from fisherdist.methods.suv.export import export_adapter, gather_trainable, save_base_copy
        from fisherdist.methods.suv.fisher_pass import load_barrier
        from fisherdist.methods.suv.train import SuvTrainer

        w = self._wrap()
        if self.barrier is None and self.cfg.fisher.enabled:
            self.barrier = load_barrier(w, self.cfg.fisher, self.cfg.lora, self.out)
        t = self.cfg.train
        retain = tokenize(load_texts(self.cfg.data.retain, self.cfg.data.text_field, self.cfg.fisher.retain_samples),
                          self.tokenizer, t.max_length) if t.projection else []
        pairs = self.pairs()
        self.log(f"[bold]train[/]: {len(pairs)} preference pairs, backend {self.cfg.dist.backend} x {self.world}")
        history = SuvTrainer(w, pairs, retain, t, self.pad_id, self.barrier if self.cfg.fisher.enabled else None,
                             checkpoint_dir=self.out / "checkpoints" / "train").run()
        tensors = gather_trainable(w)
        models = self.out / "models"
        if self.rank == 0:
            (self.out / "train_log.json").write_text(json.dumps(history, indent=1))
            save_base_copy(self.cfg.model.path, models / "base", self.dtype, self.cfg.base_copy)
            export_adapter(tensors, self.cfg.model.path, self.cfg.lora, models / "adapter", models / "unlearned", self.dtype)
        barrier()
        first, last = history[0], history[-1]
        self.log(f"train: dpo {first['dpo']:.4f} -> {last['dpo']:.4f}, R_Fisher {first['fisher_reg']:.4g} -> "
                 f"{last['fisher_reg']:.4g} over {len(history)} steps")

    # -- driver -------------------------------------------------------------------------------------
    def run(self, stages: list[str]) -> None:
        from fisherdist.methods.suv import stages as io_stages

        for stage in stages:
            start = time.perf_counter()
            if stage in ("fisher", "train"):
                getattr(self, stage)()
            else:
                getattr(io_stages, stage)(self)
            barrier()  # rank 0's files of this stage exist before any rank reads them in the next
            self.timings[stage] = round(time.perf_counter() - start, 1)
            self.log(f"[green]done[/] {stage} in {self.timings[stage]} s")
        if self.rank == 0:
            (self.out / "timings.json").write_text(json.dumps(self.timings, indent=1))


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FisherdistError(f"model.path: no tokenizer in {path} ({e})") from None


def run_stages(cfg: SuvConfig, config_text: str, stages: list[str]) -> None:
    """Entry point of the CLI: ``run`` means every stage in order."""
    todo = ALL_STAGES if "run" in stages else stages
    SuvRecipe(cfg, config_text).run(todo)
