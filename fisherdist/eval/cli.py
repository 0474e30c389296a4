"""``fisherdist eval memorization CONFIG [key=value ...]``: SUV memorisation + utility for one model, or
before/after for two (``after=DIR``), written as report.json / report.png / windows_*.jsonl under ``out``.

With ``nproc > 1`` and no launcher the command re-runs itself on that many local processes; each rank
holds a full copy of the model and scores its share of the windows (torchrun / srun work the same way).
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import Field

from fisherdist.commands import config_command
from fisherdist.config import DataFile, DataKeys, ModelConfig, Section
from fisherdist.eval.memorization import MemorizationSettings
from fisherdist.eval.utility import UtilitySettings


class EvalData(DataKeys):
    books: DataFile = Field(description="protected passages, JSONL records {book, text}")
    heldout: DataFile | None = Field(None, description="held-out general text, JSONL records {text}")
    task: DataFile | None = Field(None, description="task records {prompt, response} for greedy exact match")


class EvalConfig(Section):
    """Schema of ``configs/eval/*.yaml``."""

    model: ModelConfig
    after: ModelConfig | None = Field(None, description="second model (e.g. the unlearned one) for before/after")
    data: EvalData
    memorization: MemorizationSettings = Field(default_factory=MemorizationSettings)
    utility: UtilitySettings = Field(default_factory=UtilitySettings)
    nproc: int = Field(1, ge=1, description="local processes to spawn when not started by a launcher")
    out: str


def _load(mc: ModelConfig, device: Any) -> tuple[Any, Any]:
    """A full copy per rank, or (``load: sharded``) one FSDP2-sharded copy that all ranks run together."""
    from fisherdist.models.load import load_tokenizer
    from fisherdist.models.sharded_load import load_for_generation

    return load_for_generation(mc.path, mc.dtype, device, mc.load), load_tokenizer(mc.path)


def run(cfg: EvalConfig, config_text: str = "") -> dict[str, Any]:
    """Evaluate ``model`` (and ``after``); rank 0 writes the files and prints the table."""
    from pathlib import Path

    from fisherdist.data.jsonl import encode, read_records, write_jsonl
    from fisherdist.distributed.env import init_distributed
    from fisherdist.eval.report import print_table, write_report
    from fisherdist.eval.suite import evaluate_model

    env = init_distributed(require_group=any(mc is not None and mc.load == "sharded" for mc in (cfg.model, cfg.after)))
    m, d = cfg.memorization, cfg.data
    books = read_records(d.books, [m.book_field, m.text_field])  # bad input fails before any model loads
    heldout = [r["text"] for r in read_records(d.heldout, ["text"])] if d.heldout else None
    task = read_records(d.task, ["prompt", "response"]) if d.task else None
    results: dict[str, Any] = {}
    for label, mc in (("before", cfg.model), ("after", cfg.after)):
        if mc is None:
            continue
        model, tok = _load(mc, env.device)
        passages = [(str(r[m.book_field]), encode(tok, r[m.text_field])) for r in books]
        metrics, scores = evaluate_model(model, tok, passages, m, cfg.utility, heldout, task, label)
        results[label] = metrics
        if env.rank == 0:
            write_jsonl(Path(cfg.out) / f"windows_{label}.jsonl", [s.row() for s in scores])
        del model
    if env.rank == 0:
        out = Path(cfg.out)
        json_path, png_path = write_report(out, results["before"], results.get("after"),
                                           {"models": {"before": cfg.model.path, "after": cfg.after.path if cfg.after else None}})
        if config_text:
            (out / "config.yaml").write_text(config_text)
        print_table(results["before"], results.get("after"))
        print(f"wrote {json_path} and {png_path}")
    return results


def _run(cfg: EvalConfig, config_text: str) -> None:
    run(cfg, config_text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluation: verbatim memorisation (SUV protocol) and utility")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    config_command(ev, "memorization", EvalConfig, _run, argv_head=["eval", "memorization"],
                   help="SUV sliding-window memorisation + perplexity + task accuracy",
                   config_help="YAML config (see configs/eval/memorization_tiny.yaml)",
                   example="after.path=runs/x/models/unlearned")
