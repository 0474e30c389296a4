"""Per-rank peak statistics memory, measured from the tensor storages actually alive, against the owned share.

    python bench/fisher_memory.py --out bench/results/fisher_memory.json

For ZeRO-2, ZeRO-3 and FSDP2 on 1, 2 and 3 gloo ranks: a Llama-shaped model of ~50M parameters,
``sample`` granularity, all parameters as targets, one Fisher step. Every rank counts the bytes of the
storages allocated inside a ``TorchDispatchMode`` and still alive (:class:`LiveStorages`; peak RSS is too
noisy on CPU), once for a run that targets every parameter and once for a run that targets one small
tensor, on the same model and batch. The difference of the two peaks is the statistics' peak: the owned
share (the running sums), the bucket in flight and the per-sample work of the parameter being processed.
Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 2**20
BACKENDS = ("zero2", "zero3", "fsdp2")
# ~50M parameters: 8 layers x 4.96M + embeddings and head 2 x 5.1M
BENCH_MODEL = dict(vocab_size=8000, hidden_size=640, intermediate_size=1728, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=8)
ONE_TENSOR = ["model.norm.weight"]
ONE_LINEAR = ["model.layers.0.self_attn.k_proj.weight"]  # K-FAC's one-tensor run needs a Linear layer
# ZeRO-3's peak depends on timing: under CPU load a gathered decoder layer and embedding (+16.07 MiB here)
# can outlive their release point and land on the peak (1 run in 8 on a loaded 2-core machine, both the
# one-tensor and the all-parameter runs). The smallest of three runs is the peak of the computation itself.
RUNS = {"zero3": 3}


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages that ops run inside the mode allocated and that are still alive; ``peak`` is
    their maximum. Views share their base's storage, so nothing is counted twice."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._bytes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = id(storage), storage.nbytes()
        if key in self._bytes or nbytes == 0:
            return
        self._bytes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._bytes.pop(key)


def llama(cfg: dict[str, int], seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=64, tie_word_embeddings=False, **cfg))


def _fsdp2_unit_bytes(model: torch.nn.Module, itemsize: int) -> int:
    """Statistics of FSDP2's largest unit (a decoder layer, or the root's embeddings, norm and head)."""
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]  # type: ignore[union-attr]
    root = sum(p.numel() for p in model.parameters()) - sum(layers)
    return max(layers + [root]) * itemsize


def _peak(backend: str, cfg: dict[str, int], params: list[str], bucket_mb: float, batch: dict,
          kfac: bool = False) -> tuple[int, dict]:
    """One Fisher step's peak live bytes; ``kfac``: Kronecker factors of the matched Linear layers."""
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.fisher import FisherAccumulator, FisherSpec, fisher_step
    from fisherdist.fisher.kfac import KroneckerFactors

    model = llama(cfg)
    w = wrap_model(model, backend, micro_batch_size=batch["input_ids"].shape[0])
    spec = FisherSpec(granularity="sample", params=params, bucket_mb=bucket_mb)
    with LiveStorages() as live:
        acc: KroneckerFactors | FisherAccumulator = KroneckerFactors(w, spec) if kfac else FisherAccumulator(w, spec)
        fisher_step(w, acc, batch)
        itemsize = torch.finfo(acc.dtype).bits // 8 * (1 if kfac else len(spec.stats))
        unit = int(bucket_mb * MB) if backend.startswith("zero") or kfac else _fsdp2_unit_bytes(model, itemsize)
        sizes = {"owned": acc.placement.local_numel() * itemsize, "full": acc.placement.total_numel() * itemsize,
                 "largest_param": max(math.prod(s) for s in acc.placement.shapes.values()) * itemsize, "bucket": unit}
        acc.close()
        del acc
    del w, model
    gc.collect()
    return live.peak, sizes


def _smallest_peak(backend: str, cfg: dict[str, int], params: list[str], bucket_mb: float, batch: dict,
                   kfac: bool) -> tuple[int, dict]:
    """The smallest of ``RUNS[backend]`` peaks (see ``RUNS``) and the sizes."""
    runs = [_peak(backend, cfg, params, bucket_mb, batch, kfac) for _ in range(RUNS.get(backend, 1))]
    return min(peak for peak, _ in runs), runs[0][1]


def measure(rank: int, world: int, backends: list[str], cfg: dict[str, int], bucket_mb: float,
            kfac_params: list[str] | None = None) -> dict[str, dict]:
    """Per backend: this rank's peak statistics bytes (all-parameter run minus one-tensor run) and sizes;
    with ``kfac_params``, Kronecker factors of those Linear layers (the one-tensor run: ``ONE_LINEAR``)."""
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg["vocab_size"], (2, 16), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    kfac = kfac_params is not None
    out = {}
    for backend in backends:
        base, _ = _smallest_peak(backend, cfg, ONE_LINEAR if kfac else ONE_TENSOR, bucket_mb, batch, kfac)
        peak, sizes = _smallest_peak(backend, cfg, kfac_params or ["*"], bucket_mb, batch, kfac)
        out[backend] = {"peak_stats": peak - base, "baseline_peak": base, "all_peak": peak, **sizes}
    return out


def _plot(results: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results)
    fig, ax = plt.subplots(figsize=(max(6, len(cases) * 0.7), 4))
    x = range(len(cases))
    ax.bar([i - 0.2 for i in x], [results[c]["peak_stats"] / MB for c in cases], 0.4, label="measured peak")
    ax.bar([i + 0.2 for i in x], [results[c]["owned"] / MB for c in cases], 0.4, label="owned share")
    ax.plot(list(x), [results[c]["full"] / MB for c in cases], "k_", markersize=20, label="full statistics")
    ax.set_xticks(list(x), cases, rotation=45)
    ax.set_ylabel("statistics memory per rank (MiB)")
    ax.set_title("Fisher statistics memory, max over ranks (sample granularity, all parameters)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/fisher_memory.json")
    parser.add_argument("--worlds", default="1,2,3")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--model", default="{}", help='JSON overrides of BENCH_MODEL, e.g. {"num_hidden_layers": 4}')
    args = parser.parse_args()
    model = {**BENCH_MODEL, **json.loads(args.model)}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from bench.report import machine
    from tests.distributed import run_distributed

    results: dict[str, dict] = {}
    for world in [int(w) for w in args.worlds.split(",")]:
        per_rank = run_distributed(measure, world, args.backends.split(","), model, args.bucket_mb, timeout=3000)
        for backend in per_rank[0]:
            worst = max(per_rank, key=lambda r: r[backend]["peak_stats"])[backend]
            results[f"{backend}/{world}"] = {**worst, "per_rank_peak": [r[backend]["peak_stats"] for r in per_rank]}
            print(f"{backend}/{world}: " + ", ".join(f"{k} {v / MB:.1f} MiB" for k, v in worst.items()
                                                      if isinstance(v, int)), flush=True)
        out = Path(args.out)  # written after every world size, so a long run leaves what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"title": "Fisher statistics memory per rank", "machine": machine(),
                                   "model": model, "bucket_mb": args.bucket_mb, "results": results}, indent=1))
        _plot(results, out)
        print(f"wrote {out} and {out.with_suffix('.png')}", flush=True)


if __name__ == "__main__":
    main()
