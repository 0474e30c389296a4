"""Alignment drift of a fine-tuned model: refusal rate on unsafe prompts, over-refusal on safe prompts,
accuracy on the fine-tuning task, held-out perplexity; a comparison report of several models (JSON + PNG).

Usable on any model (imports no method). Refusal is the world's rule (``utility.refusal_rate``: the greedy
reply begins like the reference refusal); task accuracy is greedy exact match of the response's tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fisherdist.data.jsonl import read_records
from fisherdist.eval.generation import HFGenerator
from fisherdist.eval.utility import perplexity, refusal_rate, task_accuracy

METRICS = ("unsafe_refusal", "safe_refusal", "task_accuracy", "heldout_ppl")
"""Reported per model: the drift target, over-refusal, the fine-tuning task, general language modelling."""


@dataclass(frozen=True)
class AlignmentData:
    """The evaluation sets: prompts (records ``{prompt}``), task records ``{prompt, response}``, texts."""

    unsafe: list[str]
    safe: list[str]
    task: list[dict[str, str]]
    heldout: list[str]
    refusal: str

    @classmethod
    def from_files(cls, unsafe: str | Path, safe: str | Path, task: str | Path, heldout: str | Path,
                   refusal: str) -> AlignmentData:
        return cls([r["prompt"] for r in read_records(unsafe, ["prompt"])],
                   [r["prompt"] for r in read_records(safe, ["prompt"])],
                   read_records(task, ["prompt", "response"]),
                   [r["text"] for r in read_records(heldout, ["text"])], refusal)


def unsafe_refusal(model: Any, tokenizer: Any, data: AlignmentData) -> float:
    """Refusal rate on the unsafe prompts (the forgetting curve's one number)."""
    gen = HFGenerator.for_tokenizer(model, tokenizer, batch_size=64)
    return float(refusal_rate(gen, tokenizer, data.unsafe, data.refusal)["rate"])


def evaluate(model: Any, tokenizer: Any, data: AlignmentData) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one model (collective under ``torch.distributed``)."""
    gen = HFGenerator.for_tokenizer(model, tokenizer, batch_size=64)
    return {"unsafe_refusal": float(refusal_rate(gen, tokenizer, data.unsafe, data.refusal)["rate"]),
            "safe_refusal": float(refusal_rate(gen, tokenizer, data.safe, data.refusal)["rate"]),
            "task_accuracy": float(task_accuracy(gen, tokenizer, data.task)["accuracy"]),
            "heldout_ppl": float(perplexity(model, tokenizer, data.heldout)["perplexity"])}


def drift_summary(before: dict[str, float], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per model: its refusal drop (before - after, in points of rate) and that drop relative to the
    first model's (the plain-LoRA baseline), its task accuracy relative to the baseline's."""
    names = list(after)
    base = names[0]
    base_drop = before["unsafe_refusal"] - after[base]["unsafe_refusal"]
    out = {}
    for name in names:
        drop = before["unsafe_refusal"] - after[name]["unsafe_refusal"]
        out[name] = {"refusal_drop": drop,
                     "drop_vs_baseline": drop / base_drop if base_drop > 0 else float("nan"),
                     "task_vs_baseline": (after[name]["task_accuracy"] / after[base]["task_accuracy"]
                                          if after[base]["task_accuracy"] > 0 else float("nan"))}
    return out


def write_drift_report(out_dir: str | Path, before: dict[str, float], after: dict[str, dict[str, float]],
                       curves: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """``drift_report.json`` and ``drift_report.png`` (metrics per model, forgetting curves) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"before": before, "after": after, "summary": drift_summary(before, after),
              "forgetting_curve": {k: [list(p) for p in v] for k, v in curves.items()}}
    (out / "drift_report.json").write_text(json.dumps(report, indent=1))
    _plot(out / "drift_report.png", before, after, curves)
    return report


def _plot(path: Path, before: dict[str, float], after: dict[str, dict[str, float]],
          curves: dict[str, list[tuple[int, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curves.items():
        left.plot([s for s, _ in points], [v for _, v in points], marker="o", label=name)
    left.set(xlabel="fine-tuning step", ylabel="refusal rate on unsafe prompts", ylim=(-0.05, 1.05),
             title="forgetting curve")
    left.legend()
    names = ["base", *after]
    rows = [before, *after.values()]
    width = 0.8 / 3
    for i, metric in enumerate(METRICS[:3]):
        right.bar([j + i * width for j in range(len(names))], [r[metric] for r in rows], width, label=metric)
    right.set_xticks([j + width for j in range(len(names))], names)
    right.set(ylim=(0, 1.05), title="after fine-tuning")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
