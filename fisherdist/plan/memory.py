"""Per-rank bytes by component: persistent state from the placements, transient peaks from the step.

Persistent components follow one rank's placement; "per rank" is the rank with the largest persistent
total (ranks differ only where a placement is uneven). Transient components (activations, the gathered
unit, gradients before their reduce-scatter, statistics in flight) are the largest single step's, so
``total`` = persistent + transient is a peak estimate, not a sum of every buffer that ever existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fisherdist.fisher.layout import Placement
from fisherdist.plan import layout
from fisherdist.plan.methods import MethodModel, Shapes
from fisherdist.plan.model import ModelShapes

PERSISTENT = ("parameters", "gradients", "optimizer", "fisher", "method_state", "buffers")
REDUCE_BUCKET = 50_000_000  # elements: fisherdist's DeepSpeed reduce_bucket_size (wrap_deepspeed.deepspeed_config)
PERSAMPLE_CHUNK = 1 << 22  # elements of per-sample gradients formed at once (fisher.persample max_elements)


@dataclass(frozen=True)
class Job:
    model: ModelShapes
    backend: str
    world: int
    dtype_bytes: int
    micro_batch: int
    seq: int
    bucket_bytes: int | None = None  # ZeRO: statistics streamed through a bucket of this size (fisher bucket_mb)


@dataclass
class Plan:
    per_rank: dict[str, int]
    transient: dict[str, int]
    rank: int
    assumptions: list[str] = field(default_factory=list)


def _numel(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _stored(job: Job, shapes: Shapes) -> int:
    return layout.stored_numel(job.backend, shapes, job.model.units, job.world)


def _zero_partition(job: Job, trainable: Shapes) -> int:
    """Elements of the fp32 partition a ZeRO rank updates (all ranks equal)."""
    if job.backend == "zero3":
        return sum(math.ceil(math.prod(s) / job.world) for s in trainable.values())
    return layout.zero12_total(trainable, job.world) // job.world


def _gradients(job: Job, mm: MethodModel) -> int:
    pb, full = job.dtype_bytes, _numel(mm.trainable)
    if job.backend == "ddp":  # param.grad plus the reducer's bucket copies (gradient_as_bucket_view=False)
        return 2 * full * pb
    if job.backend.startswith("zero"):
        grad_bytes = max(pb, 4)  # DeepSpeed accumulates gradient partitions in fp32 for 16-bit models
        kept = full * pb if job.backend == "zero1" else 0  # ZeRO-1 keeps full grads until the step
        return kept + _zero_partition(job, mm.trainable) * grad_bytes
    return _stored(job, mm.trainable) * pb


def _optimizer(job: Job, mm: MethodModel, rank: int) -> int:
    pb = job.dtype_bytes
    plain = {f: s for f, s in mm.trainable.items() if f not in mm.owned}
    owned = _owned_bytes(job, mm, mm.owned_optimizer, rank)
    moments = 2 if mm.optimizer == "adamw" else 0
    if job.backend.startswith("zero"):
        # an fp32 master partition + fp32 moments. ZeRO-3 would share fp32 params with the master, but
        # DeepSpeed 0.19 compares a torch.device with its device *string* there, which never holds: measured
        # (tests/test_plan_measure.py), every stage keeps its own master copy
        return _zero_partition(job, plain) * 4 * (1 + moments) + owned
    if job.backend == "fsdp2":  # torch AdamW: zeros_like(local shard), unpadded, in the parameter dtype
        local = Placement.rows(plain, rank, job.world).local_numel()
    else:
        local = _stored(job, plain)
    return local * pb * moments + owned


def _owned_bytes(job: Job, mm: MethodModel, per_matrix: dict[str, int], rank: int) -> int:
    if not per_matrix:
        return 0
    placement = Placement.owned(mm.owned, rank, job.world)
    return job.dtype_bytes * sum(n for f, n in per_matrix.items() if placement.ranges[f][rank][1] > 0)


def _parameters(job: Job, mm: MethodModel) -> int:
    """Dense parameters and adapters as the backend stores them; packed weights whole on every rank."""
    dense = {f: s for f, s in job.model.shapes.items() if f not in mm.quantized}
    packed = math.ceil(_numel(mm.quantized) * mm.quant_bits / 8)
    return (_stored(job, dense) + _stored(job, mm.lora) * (1 + mm.lora_copies)) * job.dtype_bytes + packed


def _kfac_bytes(mm: MethodModel, rank: int, world: int) -> int:
    """Float64 Kronecker factors this rank owns (a layer's A and G on one rank, as fisher.kfac places them)."""
    if not mm.kfac:
        return 0
    return 8 * Placement.owned(mm.kfac, rank, world, group_of=lambda f: f[:-2]).local_numel()


def persistent(job: Job, mm: MethodModel, rank: int) -> dict[str, int]:
    """One rank's long-lived bytes by component."""
    trainable = set(mm.trainable)
    fisher_place = layout.statistic_placement(job.backend, mm.fisher_targets, trainable, job.model.units, rank, job.world)
    state_place = layout.statistic_placement(job.backend, mm.method_state, trainable, job.model.units, rank, job.world)
    return {
        "parameters": _parameters(job, mm),
        "gradients": _gradients(job, mm),
        "optimizer": _optimizer(job, mm, rank),
        "fisher": (4 * mm.fisher_sets * fisher_place.local_numel() + _owned_bytes(job, mm, mm.owned_fisher, rank)
                   + _kfac_bytes(mm, rank, job.world)),
        "method_state": (4 * state_place.local_numel() + mm.replicated_state_bytes
                         + mm.replicated_state_elems * job.dtype_bytes),
        "buffers": job.model.buffer_bytes,
    }


def activations(job: Job, mm: MethodModel) -> int:
    """Activation checkpointing per decoder layer: each layer's input kept, one layer recomputed at a time
    (~34 B*L*h values, Korthikanti et al. 2022, without the attention-score term: SDPA / flash attention),
    plus the logits, their float32 upcast in the loss and its gradient."""
    cfg = job.model.config
    tokens = job.micro_batch * mm.sequences_per_sample * job.seq
    h, layers, vocab = int(cfg.hidden_size), int(cfg.num_hidden_layers), int(cfg.vocab_size)
    return tokens * (layers * h * job.dtype_bytes + 17 * h * job.dtype_bytes + vocab * (job.dtype_bytes + 8))


def _largest_unit(job: Job, shapes: Shapes) -> int:
    per_unit = [_numel({f: s for f, s in shapes.items() if f.startswith(u)}) for u in job.model.units]
    return max(per_unit, default=_numel(shapes))


def _method_transient(job: Job, mm: MethodModel) -> int:
    """The largest of: Natural GaLore's gathered float32 gradient matrix, LQ-LoRA's dequantized matrix
    (float32, then the compute dtype), VILA / FILA init's copy of the largest adapted weight's local rows."""
    owned_grad = 4 * max((math.prod(s) for s in mm.owned.values()), default=0)
    dequant = (4 + job.dtype_bytes) * max((math.prod(s) for s in mm.quantized.values()), default=0)
    adapted = {f: s for f, s in job.model.shapes.items() if f.removesuffix(".weight") + ".lora_A.weight" in mm.lora}
    local = max((_stored(job, {f: s}) for f, s in adapted.items()), default=0)
    return max(owned_grad, dequant, mm.local_weight_copy * local)


def transient(job: Job, mm: MethodModel) -> dict[str, int]:
    """The largest step-time buffers on top of the persistent state."""
    pb, sharded = job.dtype_bytes, job.backend in layout.SHARDS_PARAMS and job.world > 1
    fsdp = job.backend in ("fsdp1", "fsdp2")
    all_params = {**job.model.shapes, **mm.lora}
    in_flight = 0
    if mm.fisher_targets and mm.granularity != "batch":
        per_unit = fsdp or job.backend in ("ddp", "none")  # fused into each unit's reduction
        if per_unit:
            in_flight = 4 * mm.stats_in_flight * _largest_unit(job, mm.fisher_targets)
        elif job.bucket_bytes:  # streamed: one bucket, or one tensor's statistics if larger
            largest = max(math.prod(s) for s in mm.fisher_targets.values())
            in_flight = max(job.bucket_bytes, 4 * mm.stats_in_flight * largest)
        else:  # the accumulator holds every target's full-shaped statistics until acc.step()
            in_flight = 4 * mm.stats_in_flight * _numel(mm.fisher_targets)
        if mm.granularity == "sample":
            in_flight += 4 * max(PERSAMPLE_CHUNK, max(math.prod(s) for s in mm.fisher_targets.values()))
    if mm.kfac:  # one layer's local factors being formed + one bucket on its way to the owners
        in_flight = 8 * max(_numel({f: s for f, s in mm.kfac.items() if f[:-2] == f2[:-2]}) for f2 in mm.kfac)
        in_flight += job.bucket_bytes or 0
    out = {
        "activations": activations(job, mm),
        "gathered_params": 2 * _largest_unit(job, all_params) * pb if sharded else 0,  # current + prefetched unit
        "unit_gradients": (_largest_unit(job, mm.trainable) * pb if fsdp
                           else min(REDUCE_BUCKET, _numel(mm.trainable)) * pb if job.backend.startswith("zero") else 0),
        "fisher_in_flight": in_flight,
        "method": _method_transient(job, mm),
    }
    out["total"] = sum(out.values())
    return out


def plan(job: Job, mm: MethodModel) -> Plan:
    """Per-rank bytes for the most loaded rank (ranks differ only in uneven placements)."""
    # rank 0 holds the most under row and flat-chunk placements; the flat-group cuts differ per rank
    irregular = job.backend in ("zero1", "zero2", "fsdp1") or bool(mm.owned or mm.kfac)  # owned: greedy per rank
    ranks = range(job.world) if irregular and job.world <= 256 else (0, job.world - 1)
    loads = {r: persistent(job, mm, r) for r in ranks}
    worst = max(loads, key=lambda r: (sum(loads[r].values()), -r))
    trans = transient(job, mm)
    per_rank: dict[str, Any] = dict(loads[worst])
    per_rank["activations"] = trans["activations"]
    per_rank["total"] = sum(loads[worst].values()) + trans["total"]
    return Plan(per_rank, trans, worst, list(mm.assumptions))
