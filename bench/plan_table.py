"""The README's planner table: ``fisherdist plan`` for 7B / 13B / 70B x 8 / 16 / 64 GPUs x FSDP2 / ZeRO-3 per landed method.

    python bench/plan_table.py            # Markdown, GiB per rank (persistent + transient peak), 80 GiB GPUs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
GPUS = (8, 16, 64)
# (method, backend) columns: every landed method on FSDP2 and ZeRO-3; Natural GaLore projects whole 2-D
# matrices, which ZeRO's flat partitions cut across, so it runs on FSDP2 (and DDP), not ZeRO
COLUMNS = (("fisher", "fsdp2"), ("fisher", "zero3"), ("suv", "fsdp2"), ("suv", "zero3"), ("ngalore", "fsdp2"))


def cell(model: str, gpus: int, backend: str, method: str) -> str:
    from fisherdist.plan.cli import add_arguments, compute

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    nodes, per_node = max(1, gpus // 8), min(gpus, 8)
    doc = compute(parser.parse_args(["--model", model, "--nodes", str(nodes), "--gpus-per-node", str(per_node),
                                     "--backend", backend, "--method", method, "--dtype", "bf16"]))
    total = doc["per_rank_bytes"]["total"] / 2**30
    fisher = (doc["per_rank_bytes"]["fisher"] + doc["per_rank_bytes"]["method_state"]) / 2**30
    return f"{total:.1f} ({fisher:.1f}){'' if doc['fits'] else ' ✗'}"


def main() -> None:
    header = [f"{m} {b}" for m, b in COLUMNS]
    print("| model | GPUs | " + " | ".join(header) + " |")
    print("|---|---|" + "---|" * len(header))
    for model in MODELS:
        for gpus in GPUS:
            cells = [cell(model, gpus, b, m) for m, b in COLUMNS]
            print(f"| {model} | {gpus} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
