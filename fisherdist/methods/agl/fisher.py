"""The Fisher information AlignGuard-LoRA and its EWC baseline need, from the engine, before fine-tuning.

* AGL: per adapted module, the top-m eigenpairs of the engine's K-FAC factors of the aligned base model on
  alignment data, G = E[g g^T] (output side, g the output gradient of the per-sample alignment NLL) and
  A = E[a a^T] (input side), computed on the factors' owner rank and broadcast
  (``KroneckerFactors.eigenbasis``), and each factor's residual level, the mean of its other eigenvalues
  (from ``KroneckerFactors.trace``: one scalar); never one global eigenbasis. The factors take every
  position up to the response's end (``kfac_tokens: context``), the prompt too: the drift changes the keys
  and values of the request's tokens, which reach the refusal decision through attention, and a Fisher of
  the response positions alone cannot see that (measured: with it AGL collapses like plain LoRA).
* EWC: the engine's per-sample diagonal empirical Fisher of the adapted base weights on the same data,
  streamed to disk one module at a time (the penalty reads only its rows back).

Both are normalised to be scale-free (the aligned model predicts its refusals confidently, so raw values
are tiny and model-dependent): eigenvalues (each side) by the mean over modules of the top eigenvalue, the diagonal
Fisher by its mean over all entries, so the lambdas mean the same thing on any model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from fisherdist.data.jsonl import special_prefix, split_encode
from fisherdist.fisher import estimate_fisher
from fisherdist.fisher.spec import FisherSpec
from fisherdist.methods.agl.adapters import ModuleBasis
from fisherdist.recipes.losses import collate_prompted

Pairs = list[tuple[list[int], list[int]]]


def encode_pairs(tokenizer: Any, rows: list[dict[str, str]]) -> Pairs:
    """(special prefix + prompt ids, response ids) per record."""
    lead = special_prefix(tokenizer)
    return [(lead + p, c) for p, c in (split_encode(tokenizer, r["prompt"], r["response"]) for r in rows)]


def rank_batches(pairs: Pairs, batch_size: int, max_length: int, pad_id: int, rank: int, world: int,
                 device: torch.device) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of prompt-masked rows; every rank gets the same number, topped up with
    copies marked ``valid=False`` (they carry no loss and are not counted)."""
    per_step = batch_size * world
    steps = -(-len(pairs) // per_step)
    out = []
    for s in range(steps):
        idx = [s * per_step + rank * batch_size + i for i in range(batch_size)]
        valid = [i < len(pairs) for i in idx]
        rows = [pairs[i if ok else 0] for i, ok in zip(idx, valid)]
        b = collate_prompted([p for p, _ in rows], [c for _, c in rows], pad_id, max_length)
        out.append({"input_ids": b.input_ids.to(device), "attention_mask": b.attention_mask.to(device),
                    "labels": b.labels.to(device), "valid": torch.tensor(valid, device=device)})
    return out


def _side(acc: Any, fqn: str, m: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Top-min(m, d) eigenpairs of one d x d factor and the mean of its other eigenvalues (0 if none left)."""
    d = acc.placement.shapes[fqn][0]
    k = min(m, d)
    values, vectors = acc.eigenbasis(fqn, k)
    rest = max(acc.trace(fqn) - float(values.sum()), 0.0) / (d - k) if k < d else 0.0
    return values, vectors, rest


def alignment_bases(wrapped: Any, batches: list[dict[str, torch.Tensor]], targets: list[str], m: int) -> dict[str, ModuleBasis]:
    """Per-module top-``m`` eigenpairs and residual levels of both K-FAC factors (collective: every rank
    calls it)."""
    spec = FisherSpec(estimator="kfac", kfac_factors="both", kfac_tokens="context", params=[f"*{t}.weight" for t in targets],
                      dtype="float64")
    acc = estimate_fisher(wrapped, batches, spec, progress=False)
    try:
        layers = sorted(acc.layers)  # type: ignore[attr-defined]
        lin = {n: acc.layers[n] for n in layers}  # type: ignore[attr-defined]
        out_side = {n: _side(acc, f"{n}.G", m) for n in layers}
        # a bias adds a constant input coordinate to A; the LoRA update acts on the weight columns only
        in_side = {n: _side(acc, f"{n}.A", m) for n in layers}
    finally:
        acc.close()
    g_norm, a_norm = (torch.stack([v[0] for v, _, _ in side.values()]).mean().clamp_min(1e-30) for side in (out_side, in_side))
    bases = {}
    for n in layers:
        (val, vec, res), (a_val, a_vec, a_res) = out_side[n], in_side[n]
        bases[n] = ModuleBasis(vectors=vec.float(), values=(val / g_norm).float(), residual=(res / g_norm).float(),
                               in_vectors=a_vec[: lin[n].in_features].float(), in_values=(a_val / a_norm).float(),
                               in_residual=(a_res / a_norm).float())
    return bases


def save_ewc_diagonal(wrapped: Any, batches: list[dict[str, torch.Tensor]], targets: list[str], out: Path,
                      shard_bytes: int = 2 << 30) -> None:
    """Diagonal empirical Fisher of the adapted base weights, mean-normalised, keyed by module name, written to
    the folder ``out`` (safetensors shards + ``model.safetensors.index.json``) without any rank holding all
    of it (~48 GB in float32 at 70B): the mean comes from each rank's share (one all-reduce), then one
    module at a time is gathered and rank 0 writes it. Collective: every rank calls it."""
    from fisherdist.distributed.collectives import barrier
    from fisherdist.models.lora_base import ShardWriter, rank0_dir

    spec = FisherSpec(estimator="empirical", granularity="sample", params=[f"*{t}.weight" for t in targets])
    acc = estimate_fisher(wrapped, batches, spec, progress=False)
    try:
        names = sorted(acc.targets)  # type: ignore[attr-defined]
        mean = _mean(acc, names)
        with rank0_dir(out) as tmp:
            writer = ShardWriter(tmp, shard_bytes) if tmp is not None else None
            for fqn in names:
                full = acc.full_fisher(fqn)  # type: ignore[attr-defined]
                if writer is not None:
                    writer.add(fqn.removesuffix(".weight"), (full.double() / mean).float().cpu())
            if writer is not None:
                writer.close({"estimator": "empirical diagonal, per sample (mean token NLL of each record)",
                              "normalised": "divided by its mean over all entries", "mean": mean})
    finally:
        acc.close()
    barrier()


def _mean(acc: Any, names: list[str]) -> float:
    """Mean over every entry of the diagonal, from each rank's share of it (as ``full_fisher`` places it)."""
    import torch.distributed as dist

    local = sum(float(acc.fisher(n).double().sum()) for n in names)
    total = torch.tensor([local], dtype=torch.float64)
    if acc.placement.world > 1:
        total = total.to(acc.fisher(names[0]).device)
        dist.all_reduce(total, group=acc.backend.group)
    count = sum(math.prod(acc.placement.shapes[n]) for n in names)
    return max(float(total) / count, 1e-30)
