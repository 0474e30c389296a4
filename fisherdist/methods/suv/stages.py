"""The generation stages of the SUV recipe (mine, prefs, eval): glue between files and the eval helpers.

They run on a plain copy of a model on every rank (or one copy sharded as the run's config says); the
helpers split windows / texts across ranks and gather, so every rank sees the same results and rank 0
writes the files. Each takes the run's :class:`~fisherdist.recipes.stages.RunContext`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fisherdist.data.jsonl import read_records, split_encode, write_jsonl
from fisherdist.errors import FisherdistError
from fisherdist.methods.suv.config import SuvConfig
from fisherdist.recipes.stages import RunContext

if TYPE_CHECKING:
    from fisherdist.methods.suv.train import PairTokens

Ctx = RunContext[SuvConfig]


def plain_model(r: Ctx, path: str | Path) -> Any:
    """The model at ``path`` to generate with, sharded as this run's config says (see ``load_for_generation``)."""
    from fisherdist.models.sharded_load import load_for_generation

    if not (Path(path) / "config.json").is_file():
        raise FisherdistError(f"no Hugging Face model directory at {path} (run the earlier SUV stages first)")
    return load_for_generation(path, r.dtype, r.env.device, r.cfg.model.load, r.cfg.dist.backend)


def mine(r: Ctx) -> None:
    """Stage 1: windows the base model reproduces -> ``mined.jsonl``."""
    from fisherdist.eval.generation import HFGenerator
    from fisherdist.eval.memorization import load_passages
    from fisherdist.methods.suv.mine import mine as mine_rows

    s = r.cfg.mine
    passages = load_passages(r.cfg.data.books, r.tokenizer, s.book_field, s.text_field)
    model = plain_model(r, r.cfg.model.path)
    gen = HFGenerator.for_tokenizer(model, r.tokenizer, temperature=s.temperature, batch_size=s.batch_size)
    rows, summary = mine_rows(passages, gen, r.tokenizer, s)
    if not rows:
        raise FisherdistError(f"mine: no window of {r.cfg.data.books} is reproduced (LCS >= {s.min_lcs} or "
                              f"ROUGE-L >= {s.min_rougeL}); nothing to unlearn")
    if r.rank == 0:
        write_jsonl(r.out / "mined.jsonl", rows)
    r.write_json("mine_summary.json", summary)
    r.log(f"mine: {summary}")


def prefs(r: Ctx) -> None:
    """Stage 2: ``mined.jsonl`` -> ``prefs.jsonl`` (chosen = a non-verbatim continuation)."""
    from fisherdist.methods.suv.prefs import prefs_file

    model = plain_model(r, r.cfg.model.path)
    _, summary = prefs_file(r.out / "mined.jsonl", r.out / "prefs.jsonl", model, r.tokenizer, r.cfg.prefs)
    r.write_json("prefs_summary.json", summary)
    r.log(f"prefs: {summary}")


def load_pairs(path: Path, tokenizer: Any, max_length: int) -> list[PairTokens]:
    """``prefs.jsonl`` -> token ids; the prompt carries the tokenizer's special prefix (BOS) as in mining."""
    from fisherdist.data.jsonl import special_prefix
    from fisherdist.methods.suv.train import PairTokens

    lead = special_prefix(tokenizer)
    pairs = []
    for rec in read_records(path, ["prompt", "chosen", "rejected"]):
        p, c = split_encode(tokenizer, rec["prompt"], rec["chosen"])
        _, rej = split_encode(tokenizer, rec["prompt"], rec["rejected"])
        pairs.append(PairTokens((lead + p)[:max_length], c, rej))
    return pairs


def _metrics(r: Ctx, model: Any) -> dict[str, Any]:
    """Memorisation on the protected passages + held-out perplexity + task accuracy of one model."""
    from fisherdist.eval.memorization import load_passages
    from fisherdist.eval.suite import evaluate_model

    m, u, data = r.cfg.memorization, r.cfg.utility, r.cfg.data
    passages = load_passages(data.books, r.tokenizer, m.book_field, m.text_field)
    heldout = [x[data.text_field] for x in read_records(data.heldout, [data.text_field])] if data.heldout else None
    task = read_records(data.task, ["prompt", "response"]) if data.task else None
    summary, _ = evaluate_model(model, r.tokenizer, passages, m, u, heldout, task)
    return {"memorization": {k: v for k, v in summary.items() if k != "utility"}, **summary["utility"]}


def protected_rows(r: Ctx) -> list[dict[str, Any]]:
    """The passages evaluated: ``{book, text, tokens}`` per record of the books file."""
    m = r.cfg.memorization
    rows = []
    for rec in read_records(r.cfg.data.books, [m.book_field, m.text_field]):
        text = rec[m.text_field]
        rows.append({"book": rec[m.book_field], "text": text, "tokens": len(r.tokenizer(text)["input_ids"])})
    return rows


def eval(r: Ctx) -> None:
    """Stage 5: before (base) vs after (``models/unlearned``) -> ``report.json``, ``report.png``."""
    from fisherdist.methods.suv.report import summary_table, write_report

    before = _metrics(r, plain_model(r, r.cfg.model.path))
    after = _metrics(r, plain_model(r, r.out / "models" / "unlearned"))
    if r.rank == 0:
        write_jsonl(r.out / "protected.jsonl", protected_rows(r))
        report = write_report(r.out, before, after, r.cfg.memorization.main_threshold)
        summary_table(report)
