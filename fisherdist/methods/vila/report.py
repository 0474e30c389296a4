"""The eval stage: TOFU metrics of the original and the unlearned model (and the retain-only reference's
forget truth ratios for the KS test), the issue's targets as ratios, report.json and report.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fisherdist.methods.vila.stages import Ctx


def _measure(r: Ctx, path: str | Path, forget: list[dict[str, Any]], retain: list[dict[str, Any]],
             reference: list[float] | None) -> dict[str, Any]:
    """One model's metrics (collective: items split across ranks)."""
    from fisherdist.data.jsonl import read_records
    from fisherdist.eval.generation import HFGenerator
    from fisherdist.eval.tofu import evaluate_tofu
    from fisherdist.eval.utility import perplexity, task_accuracy
    from fisherdist.models.load import load_model

    c, s = r.cfg, r.cfg.eval
    model = load_model(path, r.dtype).to(r.env.device)
    gen = HFGenerator.for_tokenizer(model, r.tokenizer, batch_size=s.tofu.batch_size)
    task = None
    if c.data.task:
        rows = read_records(c.data.task, ["prompt", "response"])[: s.utility.task_samples]
        task = task_accuracy(gen, r.tokenizer, rows)["accuracy"]
    out = evaluate_tofu(model, r.tokenizer, gen, forget, retain, s.tofu, task, reference)
    if c.data.heldout:
        texts = [x["text"] for x in read_records(c.data.heldout, ["text"])][: s.utility.heldout_samples]
        out["perplexity"] = perplexity(model, r.tokenizer, texts, s.utility.max_length, s.utility.batch_size)["perplexity"]
    return out


def summarise(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets as ratios to the original model."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    return {"forget_accuracy": [before["forget"]["accuracy"], after["forget"]["accuracy"]],
            "forget_accuracy_ratio": ratio(after["forget"]["accuracy"], before["forget"]["accuracy"]),
            "retain_accuracy_ratio": ratio(after["retain"]["accuracy"], before["retain"]["accuracy"]),
            "perplexity_ratio": ratio(after.get("perplexity"), before.get("perplexity")),
            "forget_quality": [before["forget_quality"], after["forget_quality"]],
            "model_utility": [before["model_utility"], after["model_utility"]]}


def evaluate_run(r: Ctx) -> dict[str, Any]:
    """Reference, before, after -> ``out/report.json`` + ``out/report.png`` (rank 0); returns the document."""
    from fisherdist.eval.tofu import tofu_records, write_tofu_report

    c = r.cfg
    forget, retain = tofu_records(c.data.forget), tofu_records(c.data.retain)
    reference = None
    if c.eval.retain_model:
        reference = _measure(r, c.eval.retain_model, forget, retain, None)["forget"]["truth_ratios"]
    before = _measure(r, c.model.path, forget, retain, reference)
    after = _measure(r, r.out / "models" / "unlearned", forget, retain, reference)
    doc = {"method": c.method, "loss": c.train.loss, "before": before, "after": after,
           "reference_truth_ratios": reference, "summary": summarise(before, after)}
    if r.rank == 0:
        write_tofu_report(r.out, doc)
    return doc
