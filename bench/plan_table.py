"""The README's planner tables: ``fisherdist plan`` for 7B / 13B / 70B x 8 / 16 / 64 GPUs, every landed method,
one table per backend (FSDP2, ZeRO-3; AlignGuard-LoRA also gets a ZeRO-2 table, its replicated route).

    python bench/plan_table.py            # Markdown, GiB per rank (persistent + transient peak), 80 GiB GPUs
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
GPUS = (8, 16, 64)
METHODS = ("fisher", "suv", "vila", "fila", "lqlora", "ngalore", "agl")
TABLES = (("fsdp2", METHODS), ("zero3", METHODS), ("zero2", ("agl",)))  # agl also on ZeRO-2 (its replicated route)


def cell(model: str, gpus: int, backend: str, method: str) -> str:
    """``total (fisher + method state)`` in GiB, ``✗`` when it does not fit; ``refused`` where the CLI refuses."""
    from fisherdist.errors import ConfigError
    from fisherdist.plan.cli import add_arguments, compute

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    nodes, per_node = max(1, gpus // 8), min(gpus, 8)
    try:
        doc = compute(parser.parse_args(["--model", model, "--nodes", str(nodes), "--gpus-per-node", str(per_node),
                                         "--backend", backend, "--method", method, "--dtype", "bf16"]))
    except ConfigError:
        return "refused"
    total = doc["per_rank_bytes"]["total"] / 2**30
    fisher = (doc["per_rank_bytes"]["fisher"] + doc["per_rank_bytes"]["method_state"]) / 2**30
    return f"{total:.1f} ({fisher:.1f}){'' if doc['fits'] else ' ✗'}"


def table(backend: str, methods: tuple[str, ...]) -> list[str]:
    lines = [f"| {backend}: model | GPUs | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for model in MODELS:
        for gpus in GPUS:
            lines.append(f"| {model} | {gpus} | " + " | ".join(cell(model, gpus, backend, m) for m in methods) + " |")
    return lines


def main() -> None:
    import fisherdist.plan.model as plan_model

    plan_model.load_model = functools.cache(plan_model.load_model)  # one meta build per model, not per cell
    for backend, methods in TABLES:
        print("\n".join(table(backend, methods)) + "\n")


if __name__ == "__main__":
    main()
