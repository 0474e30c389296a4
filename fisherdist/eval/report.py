"""Before/after report: ``report.json`` (all metrics), ``report.png`` (what a person looks at first) and
a rich table on the terminal.

A metrics dict is what :func:`fisherdist.eval.suite.evaluate_model` returns:
``{"settings", "overall", "books": {book: stats}, "utility": {"perplexity": {...}, "task": {...}}}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DELTA_KEYS = ("verbatim", "verbatim_rate", "mean_lcs", "max_lcs", "mean_rougeL")


def _utility_value(metrics: dict[str, Any], name: str) -> float | None:
    util = metrics.get("utility") or {}
    if name == "perplexity":
        return (util.get("perplexity") or {}).get("perplexity")
    return (util.get("task") or {}).get("accuracy")


def deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """``after - before`` of the headline numbers (overall memorisation, perplexity, task accuracy)."""
    out: dict[str, float | None] = {}
    for k in DELTA_KEYS:
        b, a = before["overall"].get(k), after["overall"].get(k)
        out[k] = None if a is None or b is None else a - b
    for name in ("perplexity", "task_accuracy"):
        b, a = _utility_value(before, name), _utility_value(after, name)
        out[name] = None if a is None or b is None else a - b
    return out


def _plot(path: Path, before: dict[str, Any], after: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [("before", before, "tab:red")] + ([("after", after, "tab:blue")] if after else [])
    books = list(before["books"])
    x = np.arange(len(books))
    width = 0.8 / len(runs)
    main = before["settings"]["main_threshold"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 3, 2]})
    for ax, key, title in ((axes[0], "verbatim", f"windows reproduced (LCS >= {main})"), (axes[1], "mean_lcs", "mean LCS")):
        for j, (label, m, color) in enumerate(runs):
            vals = [m["books"].get(b, {}).get(key) or 0 for b in books]
            bars = ax.bar(x + (j - (len(runs) - 1) / 2) * width, vals, width, label=label, color=color)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))
        ax.set_xticks(x, books, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend()
    ppl = [(label, _utility_value(m, "perplexity"), color) for label, m, color in runs]
    ppl = [p for p in ppl if p[1] is not None]
    axes[2].bar_label(axes[2].bar([p[0] for p in ppl], [p[1] for p in ppl], color=[p[2] for p in ppl]), fmt="%.3g")
    axes[2].set_title("held-out perplexity" if ppl else "held-out perplexity (not measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: str | Path, before: dict[str, Any], after: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``report.json`` ({before, after, delta, **extra}) and ``report.png``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"before": before, "after": after, "delta": deltas(before, after) if after else None, **(extra or {})}
    json_path, png_path = out / "report.json", out / "report.png"
    json_path.write_text(json.dumps(doc, indent=1))
    _plot(png_path, before, after)
    return json_path, png_path


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_table(before: dict[str, Any], after: dict[str, Any] | None = None, console: Any = None) -> None:
    """One row per book plus overall: verbatim windows, mean / max LCS, mean ROUGE-L (before -> after)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    main = before["settings"]["main_threshold"]
    table = Table(title="verbatim memorisation" + (" (before -> after)" if after else ""))
    for col in ("book", "windows", f"LCS>={main}", "mean LCS", "max LCS", "mean ROUGE-L"):
        table.add_column(col, justify="left" if col == "book" else "right")

    def cell(name: str, key: str) -> str:
        b = (before["overall"] if name == "overall" else before["books"][name]).get(key)
        if after is None:
            return _fmt(b)
        a = (after["overall"] if name == "overall" else after["books"].get(name, {})).get(key)
        return f"{_fmt(b)} -> {_fmt(a)}"

    for name in [*before["books"], "overall"]:
        table.add_row(name, *(cell(name, k) for k in ("windows", "verbatim", "mean_lcs", "max_lcs", "mean_rougeL")))
    console.print(table)
    for name, label in (("perplexity", "held-out perplexity"), ("task_accuracy", "task accuracy")):
        b = _utility_value(before, name)
        if b is not None:
            a = _utility_value(after, name) if after else None
            console.print(f"{label}: {_fmt(b)}" + (f" -> {_fmt(a)}" if after else ""))
