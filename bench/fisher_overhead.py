"""Training-step time with vs without Fisher accumulation, per backend and granularity, and the cost of
our per-sample path vs a naive per-example loop, torch.func vmap and Opacus, in ONE run.

    python bench/fisher_overhead.py --out bench/results/fisher_overhead.json

Two gloo processes on this machine (1 thread each) train a tiny-world-sized Llama (~5M parameters,
16 sequences x 64 tokens per micro-batch per rank) with SGD. For every backend x granularity, plain steps
and accumulating steps alternate on the same model so machine drift hits both equally; the ratio of
medians is reported. All parameters are targets. Then, in the same run, ``bench/persample.py`` times
our ``sample`` path against the per-example peers on one process. Writes JSON and a PNG bar chart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKENDS = ["ddp", "fsdp2", "fsdp1", "zero1", "zero2", "zero3"]
GRANULARITIES = ["batch", "microbatch", "sample"]


def tiny_world_sized_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _step(w, acc, batch, loss_fn) -> float:  # noqa: ANN001
    """One optimizer step; with ``acc`` the backward is recorded and the statistics accumulated."""
    from fisherdist.fisher import per_sample_nll

    t0 = time.perf_counter()
    logits = w.module(input_ids=batch["input_ids"]).logits
    nll = per_sample_nll(logits, batch["labels"])
    loss = nll.mean()
    if acc is None:
        w.backward(loss)
    else:
        with acc.record(batch["labels"], loss_scale=1.0 / nll.shape[0]):
            w.backward(loss)
        acc.step()
    w.step()
    return time.perf_counter() - t0


def _worker(rank: int, world: int, port: int, backends: list[str], steps: int, queue, dtype: str = "float32",  # noqa: ANN001
            granularities: tuple[str, ...] = tuple(GRANULARITIES)) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from fisherdist.distributed.wrap import WRAPPERS, wrap_model
    from fisherdist.fisher import FisherAccumulator, FisherSpec

    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 4096, (16, 64), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    results = {}
    for backend in backends:
        if backend not in WRAPPERS:
            results[backend] = {"skipped": "backend not available in this build"}
            continue
        for gran in granularities:
            model = tiny_world_sized_llama().to(getattr(torch, dtype))  # bf16: float32 statistics ride a 2nd collective
            w = wrap_model(model, backend, lambda ps: torch.optim.SGD(ps, lr=1e-4))
            try:
                acc = FisherAccumulator(w, FisherSpec(granularity=gran, params=["*"]))
            except Exception as e:  # noqa: BLE001 - report the case, keep measuring the others
                results[f"{backend}/{gran}"] = {"skipped": f"{type(e).__name__}: {e}"}
                continue
            plain, fisher = [], []
            for i in range(steps + 2):  # two warm-up rounds
                a, b = _step(w, None, batch, None), _step(w, acc, batch, None)
                if i >= 2:
                    plain.append(a)
                    fisher.append(b)
            acc.close()
            t = torch.tensor([statistics.median(plain), statistics.median(fisher)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
            results[f"{backend}/{gran}"] = {"plain_s": t[0].item(), "fisher_s": t[1].item(), "ratio": (t[1] / t[0]).item()}
            del w, acc
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/fisher_overhead.json")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--granularities", default=",".join(GRANULARITIES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="model dtype; statistics stay float32, so bfloat16 measures their second collective")
    parser.add_argument("--skip-persample", action="store_true", help="only the backend x granularity table")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from tests.distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    grans = tuple(args.granularities.split(","))
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args.backends.split(","), args.steps, queue, args.dtype, grans))
             for r in range(2)]
    for p in procs:
        p.start()
    results = queue.get()
    for p in procs:
        p.join()
    from bench.persample import measure
    from bench.report import write_report

    extra = {"dtype": args.dtype} if args.skip_persample else {"dtype": args.dtype,
                                                              "per_sample_vs_peers": measure(reps=args.steps, warmup=2, threads=2)}
    write_report(results, Path(args.out), title=f"Fisher accumulation overhead (2 gloo ranks, CPU, {args.dtype} model)",
                 extra=extra)


if __name__ == "__main__":
    main()
