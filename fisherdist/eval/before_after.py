"""The before/after report of a run that removes memorised text (SUV, any unlearning recipe evaluated with
:func:`fisherdist.recipes.evaluate.model_metrics`): ``report.json``, ``report.png`` and a console table.

Metrics dicts are ``{"memorization": {overall, books, ...}, "perplexity"?, "task"?}``; the plain
``fisherdist eval memorization`` command writes its own report (:mod:`fisherdist.eval.report`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Headline deltas: verbatim windows removed (fraction) and relative perplexity change."""
    vb, va = before["memorization"]["overall"]["verbatim"], after["memorization"]["overall"]["verbatim"]
    out: dict[str, Any] = {"verbatim_before": vb, "verbatim_after": va,
                           "verbatim_reduction": (vb - va) / vb if vb else None}
    if "perplexity" in before:
        pb, pa = before["perplexity"]["perplexity"], after["perplexity"]["perplexity"]
        out["perplexity_rel_change"] = pa / pb - 1
    if "task" in before:
        out["task_accuracy_change"] = after["task"]["accuracy"] - before["task"]["accuracy"]
    return out


def write_report(out: Path, before: dict[str, Any], after: dict[str, Any], main_threshold: int,
                 title: str = "before / after") -> dict[str, Any]:
    """``report.json`` ({main_threshold, before, after, change}) and ``report.png``; returns the report."""
    report = {"main_threshold": main_threshold, "before": before, "after": after, "change": _change(before, after)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_report(report, out / "report.png", title)
    return report


def plot_report(report: dict[str, Any], path: Path, title: str = "before / after") -> None:
    """Left: windows with LCS >= k before/after; right: mean LCS per book before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for tag, style in (("before", "o-"), ("after", "s-")):
        over = report[tag]["memorization"]["overall"]["over_threshold"]
        ax1.plot([int(k) for k in over], list(over.values()), style, label=tag)
    ax1.axvline(report["main_threshold"], color="grey", ls=":", label=f"verbatim (LCS >= {report['main_threshold']})")
    ax1.set(xlabel="LCS threshold k (tokens)", ylabel="windows with LCS >= k", title="verbatim reproduction")
    ax1.legend()
    books = list(report["before"]["memorization"]["books"])
    x = range(len(books))
    for i, tag in enumerate(("before", "after")):
        vals = [report[tag]["memorization"]["books"][b]["mean_lcs"] or 0 for b in books]
        ax2.bar([j + 0.4 * i for j in x], vals, width=0.4, label=tag)
    ax2.set_xticks([j + 0.2 for j in x], books, rotation=30, ha="right", fontsize=7)
    ax2.set(ylabel="mean LCS", title="per protected book")
    ax2.legend()
    c = report["change"]
    ppl = f", held-out perplexity {c['perplexity_rel_change']:+.1%}" if "perplexity_rel_change" in c else ""
    fig.suptitle(f"{title}: verbatim windows {c['verbatim_before']} -> {c['verbatim_after']}{ppl}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(report: dict[str, Any], title: str = "before / after") -> None:
    """A short rich table of the headline metrics."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title} (verbatim = LCS >= {report['main_threshold']})")
    for col in ("metric", "before", "after"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    b, a = report["before"], report["after"]
    rows = [("windows", "windows", "{}"), ("verbatim windows", "verbatim", "{}"), ("mean LCS", "mean_lcs", "{:.2f}"),
            ("max LCS", "max_lcs", "{}"), ("mean ROUGE-L", "mean_rougeL", "{:.3f}")]
    for name, key, fmt in rows:
        table.add_row(name, fmt.format(b["memorization"]["overall"][key]), fmt.format(a["memorization"]["overall"][key]))
    if "perplexity" in b:
        table.add_row("held-out perplexity", f"{b['perplexity']['perplexity']:.3f}", f"{a['perplexity']['perplexity']:.3f}")
    if "task" in b:
        table.add_row("task accuracy", f"{b['task']['accuracy']:.3f}", f"{a['task']['accuracy']:.3f}")
    Console().print(table)
    c = report["change"]
    red = f"{c['verbatim_reduction']:.1%}" if c["verbatim_reduction"] is not None else "n/a"
    ppl = f"; perplexity {c['perplexity_rel_change']:+.2%}" if "perplexity_rel_change" in c else ""
    Console().print(f"verbatim windows reduced by {red}{ppl}")
