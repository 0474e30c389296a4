"""Benchmark output shared by bench/ scripts: a rich table, JSON, and a PNG bar chart of ratios."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine() -> dict[str, str]:
    return {"platform": platform.platform(), "cpu_count": str(torch.get_num_threads()), "torch": torch.__version__}


def write_report(results: dict[str, dict], out: Path, title: str, extra: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"title": title, "machine": machine(), "results": results, **(extra or {})}, indent=1))
    table = Table(title=title)
    for col in ("case", "plain (s)", "with Fisher (s)", "ratio"):
        table.add_column(col)
    rows = {k: v for k, v in results.items() if "ratio" in v}
    for case, r in rows.items():
        table.add_row(case, f"{r['plain_s']:.4f}", f"{r['fisher_s']:.4f}", f"{r['ratio']:.3f}")
    Console().print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.5), 4))
    ax.bar(list(rows), [r["ratio"] for r in rows.values()], color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("step time ratio (with / without)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")
