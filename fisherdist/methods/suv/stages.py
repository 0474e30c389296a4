"""The SUV pipeline: mine -> prefs -> fisher -> train (+ export) -> eval, as stages that hand over files.

Files under ``out``: ``mined.jsonl``, ``prefs.jsonl`` (stages 1-2), ``fisher_{forbidden,retain}/`` (DCP),
``metrics.jsonl`` (one row per step, all stages), ``models/{base,adapter,unlearned}/``, ``protected.jsonl``, ``report.json`` /
``report.png``. Every rank runs every stage; rank 0 writes the files. ``fisher`` and ``train`` share the
wrapped training model (and the barrier) through the context's ``state`` when they run in one process.
"""

from __future__ import annotations

from typing import Any

from fisherdist.data.jsonl import write_jsonl
from fisherdist.errors import FisherdistError
from fisherdist.methods.suv.config import SuvConfig
from fisherdist.recipes.lora_run import plain_model, training_model
from fisherdist.recipes.preference import PairTokens, load_pairs
from fisherdist.recipes.stages import RunContext, StageRegistry

Ctx = RunContext[SuvConfig]


def mine(r: Ctx) -> None:
    """Stage 1: windows the base model reproduces -> ``mined.jsonl``."""
    from fisherdist.methods.suv.mine import mine_file

    s = r.cfg.mine
    rows, summary = mine_file(plain_model(r, r.cfg.model.path), r.tokenizer, r.cfg.data.books, r.out / "mined.jsonl", s)
    if not rows:
        raise FisherdistError(f"mine: no window of {r.cfg.data.books} is reproduced (LCS >= {s.min_lcs} or "
                              f"ROUGE-L >= {s.min_rougeL}); nothing to unlearn")
    r.write_json("mine_summary.json", summary)
    r.log(f"mine: {summary}")


def prefs(r: Ctx) -> None:
    """Stage 2: ``mined.jsonl`` -> ``prefs.jsonl`` (chosen = a non-verbatim continuation)."""
    from fisherdist.methods.suv.prefs import prefs_file

    model = plain_model(r, r.cfg.model.path)
    _, summary = prefs_file(r.out / "mined.jsonl", r.out / "prefs.jsonl", model, r.tokenizer, r.cfg.prefs)
    r.write_json("prefs_summary.json", summary)
    r.log(f"prefs: {summary}")


def _pairs(r: Ctx) -> list[PairTokens]:
    return load_pairs(r.out / "prefs.jsonl", r.tokenizer, r.cfg.train.max_length)


def _retain(r: Ctx, max_length: int) -> list[list[int]]:
    from fisherdist.data.batches import load_texts, tokenize

    d = r.cfg.data
    return tokenize(load_texts(d.retain, d.text_field, r.cfg.fisher.retain_samples), r.tokenizer, max_length)


def fisher(r: Ctx) -> None:
    """Stage 3: forbidden and retain Fisher of the frozen base -> ``fisher_{forbidden,retain}/``."""
    from fisherdist.methods.suv.fisher_pass import compute_and_save

    fs = r.cfg.fisher
    forbid = [p.prompt + p.rejected for p in _pairs(r)[: fs.forbid_samples]]
    retain = _retain(r, fs.max_length)
    r.log(f"[bold]fisher[/]: {len(forbid)} forbidden and {len(retain)} retain samples")
    w = training_model(r, r.cfg.train)
    r.state["barrier"] = compute_and_save(w, forbid, retain, fs, r.cfg.lora, r.pad_id, r.out, metrics=r.metrics)


def train(r: Ctx) -> None:
    """Stage 4: DPO + lambda R_Fisher (+ projection) on the adapter -> ``models/{base,adapter,unlearned}``."""
    from fisherdist.methods.suv.fisher_pass import load_barrier
    from fisherdist.methods.suv.train import SuvTrainer
    from fisherdist.recipes.lora_run import export_trained

    w, t, fs = training_model(r, r.cfg.train), r.cfg.train, r.cfg.fisher
    if "barrier" not in r.state and fs.enabled:
        r.state["barrier"] = load_barrier(w, fs, r.cfg.lora, r.out)
    pairs = _pairs(r)
    trainer = SuvTrainer(w, pairs, _retain(r, t.max_length) if t.projection else [], t, r.pad_id,
                         r.state.get("barrier") if fs.enabled else None, checkpoint_dir=r.out / "checkpoints" / "train",
                         metrics=r.metrics)
    r.log(f"[bold]train[/]: {len(pairs)} preference pairs, backend {r.cfg.dist.backend} x {r.world}")
    history = trainer.run()
    export_trained(r, w, "unlearned")
    first, last = history[0], history[-1]
    r.log(f"train: dpo {first['dpo']:.4f} -> {last['dpo']:.4f}, R_Fisher {first['fisher_reg']:.4g} -> "
          f"{last['fisher_reg']:.4g} over {len(history)} steps")


def _metrics(r: Ctx, path: Any) -> dict[str, Any]:
    from fisherdist.recipes.evaluate import model_metrics

    d = r.cfg.data
    return model_metrics(r, plain_model(r, path), d.books, r.cfg.memorization, r.cfg.utility, d.heldout, d.task,
                         d.text_field)


def eval(r: Ctx) -> None:
    """Stage 5: before (base) vs after (``models/unlearned``) -> ``report.json``, ``report.png``."""
    from fisherdist.eval.before_after import summary_table, write_report
    from fisherdist.recipes.evaluate import passage_rows

    before, after = _metrics(r, r.cfg.model.path), _metrics(r, r.out / "models" / "unlearned")
    if r.rank == 0:
        write_jsonl(r.out / "protected.jsonl", passage_rows(r, r.cfg.data.books, r.cfg.memorization))
        report = write_report(r.out, before, after, r.cfg.memorization.main_threshold, "SUV")
        summary_table(report, "SUV before / after")


STAGES = StageRegistry("suv", [("mine", mine), ("prefs", prefs), ("fisher", fisher), ("train", train), ("eval", eval)])
