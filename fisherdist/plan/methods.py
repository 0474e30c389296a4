"""What each method keeps besides the model: trainable parameters, Fisher buffers and its own state.

Every builder follows what the landed code allocates (its module is named in the docstring), checked
against the tensors a running process holds (``tests/test_plan_measure.py``); a method whose stages run
one after another (Fisher or importance, then training) has each component from the stage that holds it,
so the total is an upper bound. Every modelling choice is returned as an assumption.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

from fisherdist.errors import ConfigError
from fisherdist.plan.model import ModelShapes

Shapes = dict[str, tuple[int, ...]]
METHODS = ("fisher", "suv", "vila", "fila", "agl", "ngalore", "lqlora")
QKVO = ["*.q_proj.weight", "*.k_proj.weight", "*.v_proj.weight", "*.o_proj.weight"]
LINEAR = QKVO + ["*.gate_proj.weight", "*.up_proj.weight", "*.down_proj.weight"]
DEFAULT_RANK = {"suv": 8, "vila": 8, "fila": 8, "agl": 8, "lqlora": 64, "ngalore": 256}
STATES = ("forget", "retain")  # fisherdist.methods.vila.importance.STATES
AGL_SUBSPACE = 16  # fisherdist.methods.agl.config.AglFisher.subspace's default (test_plan checks they agree)
AGL_ALIGN_RANK = 8  # AglTrain.align_rank's default
AGL_BACKENDS = ("none", "ddp", "fsdp2", "zero1", "zero2", "zero3")  # agl.config.BACKENDS: where its penalties run
NGALORE_HISTORY = 4  # NaturalGaLoreAdamW(history=4): projected gradients kept per matrix
LQ_BUDGET = 3.5  # LqDecompose.budget's default: average bits per quantized element the ILP allocates


@dataclass(frozen=True)
class Knobs:
    """The method options ``fisherdist plan`` takes: LoRA / projection rank, LQ-LoRA bits, AGL's m."""

    r: int
    quant_bits: float | None = None
    subspace: int | None = None


@dataclass
class MethodModel:
    """A method's memory-relevant layout. Byte counts that do not follow a placement are per rank."""

    trainable: Shapes  # parameters with gradients and optimizer state (base or LoRA)
    lora: Shapes  # LoRA factors added to the model (stored like parameters)
    fisher_targets: Shapes  # parameters that carry Fisher buffers
    fisher_sets: int  # buffers per target element held at once (statistics x passes)
    stats_in_flight: int  # statistics one pass accumulates at a time
    granularity: str
    optimizer: str
    method_state: Shapes = field(default_factory=dict)  # sharded like the Fisher state, fp32
    replicated_state_bytes: int = 0  # per-rank state that is not sharded
    lora_copies: int = 0  # frozen copies of the LoRA factors (a reference adapter), stored like parameters
    owned: Shapes = field(default_factory=dict)  # whole matrices assigned to owner ranks (ngalore)
    owned_optimizer: dict[str, int] = field(default_factory=dict)  # elements (parameter dtype) per owned matrix: projector + moments
    owned_fisher: dict[str, int] = field(default_factory=dict)  # elements (parameter dtype) per owned matrix: gradient history
    quantized: Shapes = field(default_factory=dict)  # base weights stored packed on every rank (lqlora)
    quant_bits: float = 0.0  # bits per packed element
    kfac: Shapes = field(default_factory=dict)  # Kronecker factors "<layer>.A" / ".G", float64, whole on owner ranks
    replicated_state_elems: int = 0  # per-rank state in the parameter dtype, not sharded (agl's basis buffers)
    local_weight_copy: int = 0  # bytes per element of a transient copy of the largest target's local shard
    backends: tuple[str, ...] | None = None  # where the method runs (None: everywhere)
    sequences_per_sample: int = 1
    assumptions: list[str] = field(default_factory=list)


def select(shapes: Shapes, patterns: list[str]) -> Shapes:
    return {f: s for f, s in shapes.items() if any(fnmatch.fnmatchcase(f, p) for p in patterns)}


def lora_factors(base: Shapes, r: int) -> Shapes:
    """PEFT's ``lora_A`` (r x in) and ``lora_B`` (out x r) for every 2-D adapted weight."""
    out: Shapes = {}
    for fqn, shape in base.items():
        if len(shape) == 2:
            stem = fqn.removesuffix(".weight")
            out[f"{stem}.lora_A.weight"] = (r, shape[1])
            out[f"{stem}.lora_B.weight"] = (shape[0], r)
    return out


def _fisher(m: ModelShapes, params: list[str], gran: str, k: Knobs) -> MethodModel:
    for pattern in params:  # the engine refuses a pattern that matches nothing (fisher.targets): so does the plan
        if not select(m.shapes, [pattern]):
            raise ConfigError(f"--params: pattern {pattern!r} matches no parameter of {m.name} "
                              f"(names look like {', '.join(list(m.shapes)[:2])}, ...)")
    return MethodModel(dict(m.shapes), {}, select(m.shapes, params), 1, 1, gran, "none",
                       assumptions=["fisher: a Fisher pass (empirical estimator, one float32 'sq' buffer per target "
                                    "element); every parameter is trainable so microbatch/batch statistics exist"])


def _suv(m: ModelShapes, params: list[str], gran: str, k: Knobs) -> MethodModel:
    base, r = select(m.shapes, QKVO), k.r
    lora = lora_factors(base, r)
    return MethodModel(lora, lora, base, 1, 1, "sample", "adamw", method_state=dict(base),
                       replicated_state_bytes=4 * sum(math.prod(s) for s in lora.values()),
                       sequences_per_sample=2, assumptions=[
                           f"suv: LoRA r={r} on q,k,v,o; Fisher pass (one float32 buffer on the base q,k,v,o) and "
                           "training (the differential Fisher D, float32, same sharding) counted together",
                           "suv: gradient-projection EMA of the retain gradient, float32, LoRA-sized, replicated",
                           "suv: DPO reference = adapter disabled (no second model); --micro-batch counts preference "
                           "pairs, each 2 sequences (chosen, rejected)"])


def _vila(m: ModelShapes, params: list[str], gran: str, k: Knobs, *, fila: bool = False) -> MethodModel:
    """fisherdist.methods.vila: importance (importance.py: one accumulator, states forget and retain, VILA
    centered on the LoRA factors, FILA uncentered on the frozen base weights), then training (train.py)."""
    base = select(m.shapes, LINEAR)
    lora = lora_factors(base, k.r)
    name = "fila" if fila else "vila"
    targets = base if fila else lora
    stats = 1 if fila else 2  # ESTIMATOR_STATS: empirical -> sq; centered -> sq, first
    where = "the frozen base linear weights (sq)" if fila else "the LoRA factors (centered: sq and first)"
    # FisherAccumulator allocates a state on first use: forget and retain only, no default state (measured)
    return MethodModel(lora, lora, targets, len(STATES) * stats, stats, "microbatch", "adamw", lora_copies=1,
                       local_weight_copy=8, assumptions=[
                           f"{name}: LoRA r={k.r} on all 7 linear projections (the shipped configs/vila); importance "
                           f"= token-weighted microbatch Fisher on {where}, forget and retain states of one "
                           "accumulator (float32, engine sharding; the default state is never allocated); optimizer and Fisher belong to different stages "
                           "(importance, train) and are counted together",
                           f"{name}: train loss npo keeps a frozen copy of this rank's adapter shard (FrozenAdapter); "
                           "gd / ihl keep none",
                           f"{name}: init (randomized SVD of diag(rho) W on the local rows) holds one float64 copy of "
                           "the largest adapted weight's local rows (transient)"])


def _fila(m: ModelShapes, params: list[str], gran: str, k: Knobs) -> MethodModel:
    return _vila(m, params, gran, k, fila=True)


def _agl(m: ModelShapes, params: list[str], gran: str, k: Knobs) -> MethodModel:
    """fisherdist.methods.agl: the fisher stage's K-FAC factors (float64, whole on owner ranks), then the
    agl arm: task LoRA + AlignAdapter (C: m x k, A_a: k x d_in) trainable, its basis buffers replicated."""
    base = select(m.shapes, QKVO)
    sub, align = k.subspace or AGL_SUBSPACE, AGL_ALIGN_RANK
    lora = lora_factors(base, k.r)
    for fqn, (_, d_in) in base.items():
        stem = fqn.removesuffix(".weight")
        lora[f"{stem}.agl.c"] = (sub, align)
        lora[f"{stem}.agl.a"] = (align, d_in)
    kfac: Shapes = {f"{f.removesuffix('.weight')}.{side}": (d, d) for f, s in base.items() for side, d in (("A", s[1]), ("G", s[0]))}
    buffers: int = sum(d_out * sub + d_in * sub + 2 * sub + 2 for d_out, d_in in base.values())  # u, v, lam, mu, sigma, rho
    return MethodModel(lora, lora, {}, 0, 0, "sample", "adamw", kfac=kfac, replicated_state_elems=buffers,
                       backends=AGL_BACKENDS, assumptions=[
                           f"agl: LoRA r={k.r} on q,k,v,o plus the alignment adapter C ({sub} x {align}) and A_a "
                           f"({align} x d_in) per module, trainable; basis buffers U (d_out x {sub}), V (d_in x "
                           f"{sub}), eigenvalues and residual levels in the parameter dtype, replicated (method_state)",
                           "agl: fisher stage = K-FAC factors A (d_in^2) and G (d_out^2) of every adapted layer, "
                           "float64, each layer's pair whole on one owner rank (fisher); counted with the train stage",
                           f"agl: m={sub} (fisher.subspace; configs/agl/llama-*.yaml use 128: --subspace 128); the EWC "
                           "arm (its diagonal Fisher sharded like the engine's statistics, written to disk one module "
                           "at a time, each rank reading back only its penalty rows) is not planned",
                           f"agl: penalties run on {', '.join(AGL_BACKENDS)}; their transients (the small factors "
                           "gathered whole, E_RO rows in checkpointed chunks) are LoRA-sized and not counted"])


def _ngalore(m: ModelShapes, params: list[str], gran: str, k: Knobs) -> MethodModel:
    r = k.r
    mats: Shapes = {f: s for f, s in select(m.shapes, ["*attn*", "*mlp*"]).items() if len(s) == 2}
    # elements per (m x n) matrix, in the parameter dtype (fisherdist.optim allocates its state like the
    # parameter): projector P (m x r) and Adam m, v (r x n); the history s x r x n
    rank = {f: min(s[0], s[1], r) for f, s in mats.items()}
    opt = {f: rank[f] * (s[0] + 2 * s[1]) for f, s in mats.items()}
    hist = {f: NGALORE_HISTORY * rank[f] * s[1] for f, s in mats.items()}
    return MethodModel(dict(m.shapes), {}, {}, 0, 0, "batch", "adamw", owned=mats, owned_optimizer=opt,
                       owned_fisher=hist, assumptions=[
                           "ngalore: fisherdist.optim.NaturalGaLoreAdamW, one-sided projection (reference/methods.md "
                           "section 2), state in the parameter dtype",
                           f"ngalore: rank r={r}, history s={NGALORE_HISTORY} projected gradients per 2-D attn/mlp "
                           "weight; whole matrices on owner ranks under DDP (greedy by size, Placement.owned)",
                           "ngalore: other parameters (embeddings, norms, lm_head) use AdamW, sharded by the backend",
                           "ngalore: the owner gathers one full gradient matrix (float32) at a time (transient)"])


def _lqlora(m: ModelShapes, params: list[str], gran: str, k: Knobs) -> MethodModel:
    """fisherdist.methods.lqlora train stage: packed Q as uint8 buffers of QLinear (models/qlinear.py, on
    every rank whole), LoRA (A = L2/sqrt(s), B = L1/sqrt(s)) trainable with AdamW."""
    base = select(m.shapes, LINEAR)
    lora = lora_factors(base, k.r)
    bits = k.quant_bits or LQ_BUDGET
    return MethodModel(lora, lora, {}, 0, 0, gran, "adamw", quantized=base, quant_bits=bits, assumptions=[
        f"lqlora: the 7 linear projections stored packed at {bits} bits/element on average (--quant-bits; the "
        "ILP's decompose.budget), replicated on every rank (QLinear buffers, not sharded), in parameters",
        f"lqlora: LoRA r={k.r} (the shipped configs/lqlora: r = the decomposition rank 64) trainable in the model "
        "dtype; forward dequantizes one matrix at a time (float32, transient)",
        "lqlora: the offline Fisher pass is a dense model: plan it with --method fisher --params '*_proj.weight'"])


BUILDERS = {"fisher": _fisher, "suv": _suv, "vila": _vila, "fila": _fila, "agl": _agl, "ngalore": _ngalore,
            "lqlora": _lqlora}


def method_model(method: str, m: ModelShapes, params: list[str], granularity: str, lora_r: int | None,
                 quant_bits: float | None = None, subspace: int | None = None) -> MethodModel:
    knobs = Knobs(lora_r or DEFAULT_RANK.get(method, 8), quant_bits, subspace)
    return BUILDERS[method](m, params, granularity, knobs)
