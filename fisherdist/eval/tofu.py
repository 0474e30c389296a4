"""TOFU-style unlearning metrics (OpenUnlearning's definitions) on any causal LM, usable on any model pair.

Per question-answer item: the answer probability p(a|q) = exp(-mean answer-token NLL) (length-normalised,
the question masked), ROUGE-L recall of the greedy answer against the true one (``rouge_score``, stemmed),
and the truth ratio R = P_pert / P_para (P_pert the geometric mean of the perturbed answers' normalised
probabilities). Aggregates: forget ``mean(min(R, 1/R))`` (closer to 1 is better), retain
``mean(max(0, 1 - R))`` (true answer better). Forget quality is the KS-test p-value between the forget truth
ratios of a model and of the retain-only model; model utility the harmonic mean of the retain numbers
(probability, ROUGE-L, truth ratio) and the task accuracy. Items are split across ranks (the same numbers on
every rank, see :mod:`fisherdist.eval.sharding`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from fisherdist.config import Section
from fisherdist.data.jsonl import special_prefix, split_encode
from fisherdist.eval.generation import Generate
from fisherdist.eval.sharding import map_sharded

ANSWER_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")


class TofuSettings(Section):
    """The ``eval:`` knobs of the TOFU metrics."""

    batch_size: int = Field(16, gt=0, description="rows per forward / generation batch")
    max_new_tokens: int = Field(16, gt=0, description="greedy answer length for ROUGE-L and exact accuracy")


def tofu_records(path: str | Path) -> list[dict[str, Any]]:
    """TOFU-format records, checked before any compute: string question / answers and an equally long,
    non-empty list of perturbed answers on every line (one error naming file, line and key)."""
    from fisherdist.data.jsonl import read_jsonl
    from fisherdist.errors import FisherdistError

    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        bad = [k for k in ANSWER_FIELDS[:3] if not isinstance(r.get(k), str)]
        pert = r.get("perturbed_answer")
        if not bad and not (isinstance(pert, list) and pert and all(isinstance(x, str) for x in pert)
                            and len(pert) == len(rows[0]["perturbed_answer"])):
            bad = ["perturbed_answer"]
        if bad:
            raise FisherdistError(f"{path}:{i}: field {bad[0]!r} missing or malformed (expected TOFU records: strings "
                                  "question, answer, paraphrased_answer and a list of perturbed_answer strings, "
                                  "as long on every line)")
    return rows


# -- pure metric functions -------------------------------------------------------------------------------
def probability(mean_nll: float) -> float:
    """p(a|q) from the answer's mean token NLL."""
    return math.exp(-mean_nll)


def truth_ratio(para_nll: float, perturbed_nlls: Sequence[float]) -> float:
    """R = P_pert / P_para with P_pert = exp(-mean of the perturbed answers' mean NLLs)."""
    return math.exp(para_nll - sum(perturbed_nlls) / len(perturbed_nlls))


def forget_truth_ratio(ratios: Sequence[float]) -> float:
    """``closer_to_1_better``: mean of min(R, 1/R)."""
    return sum(min(r, 1 / r) for r in ratios) / len(ratios)


def retain_truth_ratio(ratios: Sequence[float]) -> float:
    """``true_better``: mean of max(0, 1 - R)."""
    return sum(max(0.0, 1 - r) for r in ratios) / len(ratios)


def rouge_l_recall(reference: str, generated: str) -> float:
    """ROUGE-L recall of ``generated`` against ``reference`` (rouge_score, stemmed; TOFU's rougeL_recall)."""
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, generated)["rougeL"].recall)


def forget_quality(model_ratios: Sequence[float], retain_model_ratios: Sequence[float]) -> float:
    """Two-sample KS-test p-value of the two truth-ratio distributions (1 = indistinguishable)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(list(model_ratios), list(retain_model_ratios)).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any component is 0 (one destroyed ability zeroes the utility)."""
    if min(values) <= 0:
        return 0.0
    return len(values) / sum(1 / v for v in values)


# -- model-level measurements ----------------------------------------------------------------------------
@torch.no_grad()
def _mean_nlls(model: Any, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> list[float]:
    """Mean NLL of each continuation given its prompt (float64; prompt tokens carry no loss)."""
    device, out = next(model.parameters()).device, []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo : lo + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (p, c) in enumerate(chunk):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            scored[i, len(p) : len(p) + len(c)] = True
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * scored[:, 1:]
        out += (nll.sum(1) / scored[:, 1:].sum(1)).tolist()
    return out


def answer_nlls(model: Any, tokenizer: Any, questions: Sequence[str], answers: Sequence[str],
                batch_size: int = 16) -> list[float]:
    """Mean answer-token NLL of each (question, answer) pair (BOS + question as the prompt); collective."""
    lead, pad = special_prefix(tokenizer), tokenizer.pad_token_id or 0
    pairs = [(lead + p, c) for p, c in (split_encode(tokenizer, q, a) for q, a in zip(questions, answers))]
    was_training = model.training
    model.eval()
    try:
        return map_sharded(pairs, lambda ps: _mean_nlls(model, ps, pad, batch_size))
    finally:
        model.train(was_training)


def greedy_answers(generate: Generate, tokenizer: Any, rows: Sequence[dict[str, Any]],
                   max_new_tokens: int) -> list[tuple[str, bool]]:
    """(decoded greedy answer cut at the first line break, exact: it starts with the answer's tokens)."""
    lead = special_prefix(tokenizer)
    pairs = [split_encode(tokenizer, r["question"], r["answer"]) for r in rows]

    def local(ps: list[tuple[list[int], list[int]]]) -> list[tuple[str, bool]]:
        outs = generate([lead + p for p, _ in ps], max_new_tokens)
        return [(tokenizer.decode(o, skip_special_tokens=True).split("\n")[0], list(o[: len(c)]) == c)
                for (_, c), o in zip(ps, outs)]

    return map_sharded(pairs, local)


def score_items(model: Any, tokenizer: Any, generate: Generate, rows: Sequence[dict[str, Any]],
                settings: TofuSettings) -> list[dict[str, float]]:
    """Per item: probability, truth ratio, ROUGE-L recall and exact greedy match (collective)."""
    q, b = [r["question"] for r in rows], settings.batch_size
    true = answer_nlls(model, tokenizer, q, [r["answer"] for r in rows], b)
    para = answer_nlls(model, tokenizer, q, [r["paraphrased_answer"] for r in rows], b)
    k = len(rows[0]["perturbed_answer"])
    flat = answer_nlls(model, tokenizer, [x for x in q for _ in range(k)],
                       [a for r in rows for a in r["perturbed_answer"]], b)
    greedy = greedy_answers(generate, tokenizer, rows, settings.max_new_tokens)
    return [{"probability": probability(t), "truth_ratio": truth_ratio(p, flat[i * k : (i + 1) * k]),
             "rougeL_recall": rouge_l_recall(r["answer"], g), "exact": float(ok)}
            for i, (r, t, p, (g, ok)) in enumerate(zip(rows, true, para, greedy))]


def summarise_split(items: Sequence[dict[str, float]], forget: bool) -> dict[str, Any]:
    """Means over items, the split's truth-ratio aggregate, and the raw ratios (for the KS test)."""
    n = len(items)
    ratios = [x["truth_ratio"] for x in items]
    return {"items": n, "probability": sum(x["probability"] for x in items) / n,
            "rougeL_recall": sum(x["rougeL_recall"] for x in items) / n,
            "accuracy": sum(x["exact"] for x in items) / n,
            "truth_ratio": forget_truth_ratio(ratios) if forget else retain_truth_ratio(ratios),
            "truth_ratios": ratios}


def evaluate_tofu(model: Any, tokenizer: Any, generate: Generate, forget: Sequence[dict[str, Any]],
                  retain: Sequence[dict[str, Any]], settings: TofuSettings, task_accuracy: float | None = None,
                  reference_ratios: Sequence[float] | None = None) -> dict[str, Any]:
    """``{"forget", "retain", "model_utility", "forget_quality"}`` of one model (collective).

    ``reference_ratios``: the retain-only model's forget truth ratios (no forget quality without them)."""
    f = summarise_split(score_items(model, tokenizer, generate, forget, settings), forget=True)
    r = summarise_split(score_items(model, tokenizer, generate, retain, settings), forget=False)
    parts = [r["probability"], r["rougeL_recall"], r["truth_ratio"]]
    parts += [task_accuracy] if task_accuracy is not None else []
    fq = forget_quality(f["truth_ratios"], reference_ratios) if reference_ratios else None
    return {"forget": f, "retain": r, "model_utility": model_utility(parts), "forget_quality": fq,
            "task_accuracy": task_accuracy}


# -- report ----------------------------------------------------------------------------------------------
PLOTTED = (("forget", "accuracy"), ("forget", "probability"), ("forget", "truth_ratio"), ("retain", "accuracy"),
           ("retain", "probability"), ("retain", "truth_ratio"))


def _plot(path: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(PLOTTED))
    for j, (label, m, color) in enumerate((("before", before, "tab:red"), ("after", after, "tab:blue"))):
        bars = left.bar(x + (j - 0.5) * 0.4, [m[s][k] for s, k in PLOTTED], 0.4, label=label, color=color)
        left.bar_label(bars, fmt="%.2f", fontsize=7)
        util = right.bar([j], [m["model_utility"]], 0.6, color=color, label=label)
        right.bar_label(util, fmt="%.2f", fontsize=7)
    left.set_xticks(x, [f"{s} {k}" for s, k in PLOTTED], rotation=20, ha="right", fontsize=8)
    left.set_ylim(0, 1.05)
    left.legend()
    left.set_title("TOFU metrics (forget: lower accuracy / probability is better)")
    right.set_xticks([0, 1], ["before", "after"])
    right.set_title("model utility")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_tofu_report(out_dir: str | Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    """``report.json`` (the whole document) and ``report.png`` (before / after bars)."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(doc, indent=1))
    _plot(out / "report.png", doc["before"], doc["after"])
    return out / "report.json", out / "report.png"
