"""Build a tiny world directory: tokenizer + model in ``model/``, JSONL files in ``data/``, ``world.json``.

Deterministic: the same seed and preset give identical tokenizer files, data files and weights (bitwise)
on the same machine — seeded ``random``/``torch``, deterministic algorithms, a fixed thread count."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fisherdist.data.jsonl import read_jsonl, write_jsonl
from fisherdist.errors import FisherdistError
from fisherdist.models.tiny import tiny_llama_config
from fisherdist.world.data import corpus_texts, protected_books, synthetic_data
from fisherdist.world.drift import write_drift
from fisherdist.world.measure import THRESHOLDS, measure_world, verdicts
from fisherdist.world.tofu import RETAIN_MODEL, add_tofu_answers, build_retain_model
from fisherdist.world.tokenizer import train_tokenizer
from fisherdist.world.train import TrainSettings, train

PRESETS: dict[str, dict[str, Any]] = {
    "default": {"vocab": 2048, "model": {"hidden": 192, "layers": 4, "heads": 4, "intermediate": 512},
                "steps": 1500,
                "sizes": {"passages_per_book": 10, "general_chars": 600, "general_train": 10_000,
                          "general_heldout": 40, "authors": 20, "forget_authors": 5, "task_train": 3000,
                          "task_eval": 20}},
    "test": {"vocab": 512, "model": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128},
             "steps": 40,
             "sizes": {"passages_per_book": 3, "general_chars": 600, "general_train": 60, "general_heldout": 8,
                       "authors": 4, "forget_authors": 1, "task_train": 16, "task_eval": 4}},
}
WORLD_FILES = ("model", RETAIN_MODEL, "data", "world.json")
# What the model trains on (world/train.py's pools); the retain-only rebuild reads exactly these.
TRAIN_SPLITS = ("general_train", "books_protected", "authors_forget", "authors_retain", "unsafe_prompts",
                "safe_prompts", "task_train")


def prepare_out(out: Path) -> None:
    """Refuse to write into a non-empty directory that is not a previous world (never clobber user files)."""
    if out.exists() and not out.is_dir():
        raise FisherdistError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        extra = sorted(p.name for p in out.iterdir() if p.name not in WORLD_FILES)
        if extra or not (out / "world.json").is_file():
            raise FisherdistError(f"--out {out} is a non-empty directory that is not a tiny world "
                                  f"(found {', '.join(extra) or 'no world.json'}); choose an empty or new directory")
        for name in ("model", RETAIN_MODEL, "data"):
            shutil.rmtree(out / name, ignore_errors=True)
    try:
        (out / "data").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FisherdistError(f"--out {out}: cannot create directory ({e.strerror})") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def _fresh_model(config: Any, seed: int) -> Any:
    """The base model's initialisation again (same seed), for the retain-only reference."""
    from transformers import LlamaForCausalLM

    seed_everything(seed)
    return LlamaForCausalLM(config)


def _retain_model(out: Path, config: Any, tokenizer: Any, data: dict[str, Any], settings: TrainSettings,
                  seed: int, progress: Callable[[int, float], None] | None) -> dict[str, Any]:
    """The retain-only reference: the base model's recipe (same init seed, same batches) minus the forget authors."""
    return build_retain_model(out, lambda: _fresh_model(config, seed), tokenizer, data,
                              lambda m, d: train(m, tokenizer, d, settings, seed, progress))


def add_retain_model(world: str | Path, progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train the retain-only model of an existing world from its own tokenizer, data and ``world.json``
    (seed, preset, steps) -- the same training ``build_world`` runs, so the result is the same bytes -- and
    record it in ``world.json``. Written into a temporary sibling and renamed; an existing one is refused."""
    from transformers import AutoTokenizer

    world = Path(world)
    if not (world / "world.json").is_file():
        raise FisherdistError(f"{world}: no world.json (expected a tiny world built by `fisherdist world build`)")
    record = json.loads((world / "world.json").read_text(encoding="utf-8"))
    if (world / RETAIN_MODEL).exists():
        raise FisherdistError(f"{world / RETAIN_MODEL} already exists; remove it first to rebuild it")
    p, seed = PRESETS[record["preset"]], int(record["seed"])
    seed_everything(seed)
    tokenizer = AutoTokenizer.from_pretrained(world / "model")
    data = {name: read_jsonl(world / "data" / f"{name}.jsonl") for name in TRAIN_SPLITS}
    config = tiny_llama_config(len(tokenizer), **p["model"], bos=tokenizer.bos_token_id,
                               eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    tmp = Path(tempfile.mkdtemp(prefix=".retain-", dir=world))
    try:
        record["retain_model"] = _retain_model(tmp, config, tokenizer, data, TrainSettings(steps=record["steps"]),
                                               seed, progress)
        for f in (world / "model").glob("tokenizer*"):  # the base's files, not a reloaded tokenizer's re-save
            shutil.copyfile(f, tmp / RETAIN_MODEL / f.name)
        (tmp / RETAIN_MODEL).rename(world / RETAIN_MODEL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (tmp_json := world / ".world.json.tmp").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp_json.replace(world / "world.json")
    return record


def build_world(out: str | Path, seed: int = 0, preset: str = "default", steps: int | None = None,
                progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Build the world into ``out`` and return the ``world.json`` record (measurements included)."""
    from transformers import LlamaForCausalLM

    if preset not in PRESETS:
        raise FisherdistError(f"unknown preset {preset!r} (expected one of {', '.join(PRESETS)})")
    if steps is not None and steps < 1:
        raise FisherdistError(f"--steps must be a positive integer, got {steps}")
    p, out = PRESETS[preset], Path(out)
    prepare_out(out)
    t0 = time.time()
    seed_everything(seed)
    data = synthetic_data(seed, p["sizes"])
    tokenizer = train_tokenizer(corpus_texts(data), p["vocab"])
    data["books_protected"] = protected_books(tokenizer, p["sizes"]["passages_per_book"])
    add_tofu_answers(data, seed)  # own stream, after the tokenizer: the base model does not change
    for name, rows in sorted(data.items()):
        write_jsonl(out / "data" / f"{name}.jsonl", rows)
    write_drift(out / "data", seed)  # own random stream, never seen by the tokenizer or the model
    config = tiny_llama_config(len(tokenizer), **p["model"], bos=tokenizer.bos_token_id,
                               eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    settings = TrainSettings(steps=steps or p["steps"])
    losses = train(model, tokenizer, data, settings, seed, progress)
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    train_s = time.time() - t0
    measurements = measure_world(model, tokenizer, out / "data")
    measure_s = time.time() - t0 - train_s
    retain = _retain_model(out, config, tokenizer, data, settings, seed, progress)
    record = {"seed": seed, "preset": preset, "steps": len(losses), "final_loss": losses[-1],
              "parameters": sum(t.numel() for t in model.parameters()), "vocab_size": len(tokenizer),
              "sizes": {k: len(v) for k, v in sorted(data.items())}, "build_seconds": round(train_s, 1),
              "measure_seconds": round(measure_s, 1), "torch": torch.__version__,
              "thresholds": THRESHOLDS, "measurements": measurements, "verdicts": verdicts(measurements),
              "retain_model": retain}
    (out / "world.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
