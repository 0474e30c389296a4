"""Training-step time with vs without Fisher accumulation, per backend and granularity, for the current
engine AND the engine before the exactness / streaming rework (issue 9), in ONE run; optionally the
per-sample path vs a naive per-example loop, torch.func vmap and Opacus.

    python bench/fisher_overhead.py --out bench/results/fisher_overhead.json
    python bench/fisher_overhead.py --dtype bfloat16 --backends ddp,fsdp1,fsdp2 --out bench/results/fisher_overhead_bf16.json

Two gloo processes on this machine (1 thread each) train a tiny-world-sized Llama (~5M parameters,
16 sequences x 64 tokens per micro-batch per rank) with SGD, all parameters targeted. The base engine is
``git archive BASE`` of ``fisherdist/`` renamed ``fisherdist_base`` in a temporary directory, so both
engines live in the same processes: per backend x granularity each engine wraps its own copy of the
model, and plain and accumulating steps of both engines alternate in a rotating order, so machine drift
and load hit all four equally. Reported: each engine's ratio of medians (with / without Fisher) and the
current ratio over the base ratio. With ``--dtype bfloat16`` the current engine reduces the statistics in
float32 in a second collective inside the gradient's hook; the base cast them to bf16 into the gradient's
collective, so that run's current-over-base ratio is the second collective's cost.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ["ddp", "fsdp2", "fsdp1", "zero1", "zero2", "zero3"]
GRANULARITIES = ["batch", "microbatch", "sample"]
BASE = "7d00adf"  # the last commit before issue 9's engine changes (87034c5 is the first)
ENGINES = ("fisherdist", "fisherdist_base")


def base_engine(commit: str, into: Path) -> Path:
    """``fisherdist/`` at ``commit`` as the package ``fisherdist_base`` under ``into`` (every reference renamed)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "fisherdist"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    pkg = into / "fisherdist_base"
    (into / "fisherdist").rename(pkg)
    for f in pkg.rglob("*.py"):
        f.write_text(re.sub(r"\bfisherdist\b", "fisherdist_base", f.read_text()))
    return into


def tiny_world_sized_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _step(w: Any, acc: Any, batch: dict[str, torch.Tensor]) -> float:
    """One optimizer step; with ``acc`` the backward is recorded and the statistics accumulated."""
    t0 = time.perf_counter()
    logits = w.module(input_ids=batch["input_ids"]).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                            reduction="none").view(logits.shape[0], -1).mean(1)
    loss = nll.mean()
    if acc is None:
        w.backward(loss)
    else:
        with acc.record(batch["labels"], loss_scale=1.0 / nll.shape[0]):
            w.backward(loss)
        acc.step()
    w.step()
    return time.perf_counter() - t0


def _setup(engine: str, backend: str, gran: str, dtype: str) -> tuple[Any, Any]:
    """``engine``'s wrapped model and accumulator (the base engine's wrapper lived in ``dist``)."""
    wrap = importlib.import_module(f"{engine}.distributed.wrap" if engine == "fisherdist" else f"{engine}.dist.wrap")
    fisher = importlib.import_module(f"{engine}.fisher")
    model = tiny_world_sized_llama().to(getattr(torch, dtype))
    w = wrap.wrap_model(model, backend, lambda ps: torch.optim.SGD(ps, lr=1e-4))
    return w, fisher.FisherAccumulator(w, fisher.FisherSpec(granularity=gran, params=["*"]))


def _measure(backend: str, gran: str, dtype: str, steps: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Plain / Fisher steps of both engines, rotating the order each round; medians, slowest rank."""
    setups = {e: _setup(e, backend, gran, dtype) for e in ENGINES}
    runs = [(e, fisher) for e in ENGINES for fisher in (False, True)]
    times: dict[tuple[str, bool], list[float]] = {r: [] for r in runs}
    for i in range(steps + 2):  # two warm-up rounds
        for k in range(len(runs)):
            e, fisher = runs[(i + k) % len(runs)]
            w, acc = setups[e]
            t = _step(w, acc if fisher else None, batch)
            if i >= 2:
                times[e, fisher].append(t)
    for _, acc in setups.values():
        acc.close()
    t = torch.tensor([statistics.median(times[r]) for r in runs])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
    plain, fisher, base_plain, base_fisher = t.tolist()
    ratio, base_ratio = fisher / plain, base_fisher / base_plain
    return {"plain_s": plain, "fisher_s": fisher, "ratio": ratio, "base_plain_s": base_plain,
            "base_fisher_s": base_fisher, "base_ratio": base_ratio, "ratio_vs_base": ratio / base_ratio}


def _worker(rank: int, world: int, port: int, base_dir: str, cases: list[tuple[str, str]], steps: int,
            dtype: str, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    sys.path.insert(0, base_dir)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 4096, (16, 64), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    results: dict[str, dict[str, Any]] = {}
    for backend, gran in cases:
        try:
            results[f"{backend}/{gran}"] = _measure(backend, gran, dtype, steps, batch)
        except Exception as e:  # report the case, keep measuring the others
            results[f"{backend}/{gran}"] = {"skipped": f"{type(e).__name__}: {e}"}
        if rank == 0:
            print(backend, gran, results[f"{backend}/{gran}"], flush=True)
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/fisher_overhead.json")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--base", default=BASE, help="commit of the engine to compare against")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--granularities", default=",".join(GRANULARITIES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model dtype; bfloat16 measures the float32 statistics' second collective")
    parser.add_argument("--persample", action="store_true", help="also time the per-sample path vs its peers")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from tests.distributed import free_port

    cases = [(b, g) for b in args.backends.split(",") for g in args.granularities.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = str(base_engine(args.base, Path(tmp)))
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, 2, port, base_dir, cases, args.steps, args.dtype, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        results = queue.get()
        for p in procs:
            p.join()
    from bench.report import write_report

    extra: dict[str, Any] = {"dtype": args.dtype, "base_commit": args.base, "load_average": os.getloadavg()}
    if args.persample:
        from bench.persample import measure

        extra["per_sample_vs_peers"] = measure(reps=args.steps, warmup=2, threads=2)
    write_report(results, Path(args.out), title=f"Fisher accumulation overhead (2 gloo ranks, CPU, {args.dtype} model)",
                 extra=extra)


if __name__ == "__main__":
    main()
