"""What each method keeps besides the model: trainable parameters, Fisher buffers and its own state.

``fisher``, ``suv`` and ``ngalore`` describe what the landed code allocates. ``vila``, ``fila``, ``agl`` and
``lqlora``'s training stage are modelled from the reference notes (``reference/methods.md``) and
every modelling choice is returned as an assumption, so ``fisherdist plan --json`` says what it guessed.
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
AGL_BASIS = 128  # top-m eigenvectors per adapted module
NGALORE_HISTORY = 4  # NaturalGaLoreAdamW(history=4): projected gradients kept per matrix
LQ_BITS = 4.127  # NF4 with 8-bit double-quantised scales (B0=64, B1=256, fp32): LQ-LoRA's "nf4" config


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
    quantized: Shapes = field(default_factory=dict)  # base weights stored packed (lqlora)
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


def _fisher(m: ModelShapes, params: list[str], gran: str, r: int) -> MethodModel:
    for pattern in params:  # the engine refuses a pattern that matches nothing (fisher.targets): so does the plan
        if not select(m.shapes, [pattern]):
            raise ConfigError(f"--params: pattern {pattern!r} matches no parameter of {m.name} "
                              f"(names look like {', '.join(list(m.shapes)[:2])}, ...)")
    return MethodModel(dict(m.shapes), {}, select(m.shapes, params), 1, 1, gran, "none",
                       assumptions=["fisher: a Fisher pass (empirical estimator, one float32 'sq' buffer per target "
                                    "element); every parameter is trainable so microbatch/batch statistics exist"])


def _suv(m: ModelShapes, params: list[str], gran: str, r: int) -> MethodModel:
    base = select(m.shapes, QKVO)
    lora = lora_factors(base, r)
    return MethodModel(lora, lora, base, 1, 1, "sample", "adamw", method_state=dict(base),
                       replicated_state_bytes=4 * sum(math.prod(s) for s in lora.values()),
                       sequences_per_sample=2, assumptions=[
                           f"suv: LoRA r={r} on q,k,v,o; Fisher pass (one float32 buffer on the base q,k,v,o) and "
                           "training (the differential Fisher D, float32, same sharding) counted together",
                           "suv: gradient-projection EMA of the retain gradient, float32, LoRA-sized, replicated",
                           "suv: DPO reference = adapter disabled (no second model); --micro-batch counts preference "
                           "pairs, each 2 sequences (chosen, rejected)"])


def _vila(m: ModelShapes, params: list[str], gran: str, r: int, *, fila: bool = False) -> MethodModel:
    base = select(m.shapes, LINEAR)
    lora = lora_factors(base, r)
    name = "fila" if fila else "vila"
    targets = base if fila else lora
    where = "the full base linear weights (uncentered)" if fila else "the LoRA factors (centered: sq and first)"
    stats = 1 if fila else 2
    return MethodModel(lora, lora, targets, 2 * stats, stats, "microbatch", "adamw", lora_copies=1, assumptions=[
                           f"{name}: not landed; modelled from reference/methods.md section 4",
                           f"{name}: LoRA r={r} on all 7 linear projections; importance = token-weighted microbatch "
                           f"Fisher on {where}, forget and retain sets held at once (float32, engine sharding)",
                           f"{name}: NPO reference = the frozen initial adapter (A0, B0), stored like the LoRA factors",
                           f"{name}: init (Fisher-weighted SVD) runs module by module: one float32 full-size "
                           "importance of the largest adapted weight is transient"])


def _fila(m: ModelShapes, params: list[str], gran: str, r: int) -> MethodModel:
    return _vila(m, params, gran, r, fila=True)


def _agl(m: ModelShapes, params: list[str], gran: str, r: int) -> MethodModel:
    base = select(m.shapes, QKVO)
    lora = lora_factors(base, r)
    bases = AGL_BASIS * 4 * sum(s[0] for s in base.values())
    return MethodModel(lora, lora, base, 1, 1, "sample", "adamw", replicated_state_bytes=bases, assumptions=[
        "agl: not landed; modelled from reference/methods.md section 1 (reconstructed objective)",
        f"agl: LoRA r={r} on q,k,v,o; per-module alignment basis U (d_out x {AGL_BASIS}, float32, replicated)",
        "agl: H = diagonal alignment Fisher of the adapted base weights (float32, engine sharding), kept in training",
        "agl: E_RO materialised in row chunks (transient, not counted)"])


def _ngalore(m: ModelShapes, params: list[str], gran: str, r: int) -> MethodModel:
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


def _lqlora(m: ModelShapes, params: list[str], gran: str, r: int) -> MethodModel:
    base = select(m.shapes, LINEAR)
    lora = lora_factors(base, r)
    return MethodModel(lora, lora, {}, 0, 0, gran, "adamw", quantized=base, assumptions=[
        "lqlora: not landed; modelled from reference/methods.md section 3 (training stage)",
        f"lqlora: the 7 linear projections stored packed at {LQ_BITS} bits/element (NF4 + double-quantised "
        f"scales), sharded like parameters; LoRA r={r} trainable in the model dtype",
        "lqlora: the offline Fisher pass is a dense model: plan it with --method fisher --params '*_proj.weight'"])


BUILDERS = {"fisher": _fisher, "suv": _suv, "vila": _vila, "fila": _fila, "agl": _agl, "ngalore": _ngalore,
            "lqlora": _lqlora}


def method_model(method: str, m: ModelShapes, params: list[str], granularity: str, lora_r: int | None) -> MethodModel:
    r = lora_r or DEFAULT_RANK.get(method, 8)
    return BUILDERS[method](m, params, granularity, r)
