"""The planner's per-rank bytes against what running processes hold, measured from the tensors themselves.

For the tiny world's model (1 rank) and a larger CPU-sized Llama with awkward sizes (rows not divisible by 2
or 3; 1, 2 and 3 ranks), each rank wraps a float32 model (FSDP2, ZeRO-3), builds a Fisher accumulator on every parameter, runs one
recorded AdamW step and reports the bytes of the storages behind its parameter shards, gradient shards,
optimizer state and Fisher buffers (each storage counted once, in that order). The planner, run in the
parent from the config file alone, must match every rank within 5%. The same launches check the
planner's DeepSpeed ZeRO-1/2 partition arithmetic against live engines' ``lp_fragment_address`` (3 ranks)
and, at 1 and 2 ranks, every LoRA method on the larger model through the methods' own code: VILA and FILA
(``importance_spec`` / ``record_batch`` states, then a train step with the NPO ``FrozenAdapter``; FSDP2,
and ZeRO-3 on 2 ranks), LQ-LoRA (``quantized_lora``'s packed ``QLinear`` buffers + LoRA; FSDP2) and AlignGuard-LoRA
(``alignment_bases``' K-FAC factors, then ``attach`` + ``AglPenalty``; one process and DDP, the backends
it runs on).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

from fisherdist.models.peft_utils import LoraSettings
from tests.distributed import run_distributed

WORLD_MODEL = Path(__file__).resolve().parents[1] / "fisherdist" / "world" / "default" / "model"
LARGER = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 320, "intermediate_size": 856,
          "num_hidden_layers": 3, "num_attention_heads": 5, "num_key_value_heads": 1, "vocab_size": 5003,
          "max_position_embeddings": 64, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
BACKENDS = ("fsdp2", "zero3")
SEQ, MB = 16, 2
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AGL_M = 16  # alignment subspace (the planner's --subspace)
NF4_BITS = 4.127  # QConfig.parse("nf4").bits_per_param(): the planner's --quant-bits for the packed layers
LORA_ALL = LoraSettings(r=8, alpha=16, dropout=0.0, targets=LINEAR)  # VILA / FILA / LQ-LoRA: all 7 projections
LORA_QKVO = LoraSettings(r=8, alpha=16, dropout=0.0)  # AGL: q, k, v, o


def _config_path(tmp: Path, name: str) -> str:
    """The world's model directory, or LARGER's config with random float32 weights (the methods load them)."""
    if name == "world":
        return str(WORLD_MODEL)
    path = tmp / "larger" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(LARGER))
    _build(str(path.parent)).save_pretrained(path.parent)
    return str(path.parent)


def _build(config_dir: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(config_dir)
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).to(torch.float32)


class _Meter:
    """Bytes of distinct storages: a view into a buffer already counted adds nothing."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def __call__(self, tensors: list[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            t = t.to_local() if hasattr(t, "to_local") else t
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.seen and storage.nbytes() > 0:
                self.seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total


def _state_tensors(state: dict) -> list[torch.Tensor]:
    return [v for per in state.values() for v in per.values() if isinstance(v, torch.Tensor)]


def _measure(w, acc, backend: str) -> dict[str, int]:
    meter = _Meter()
    model = w.unwrapped
    if backend == "zero3":
        opt = w.module.optimizer
        params = meter([p.ds_tensor for p in model.parameters()])
        grads = meter([opt.grad_partitions_flat_buffer])
        optimizer = meter(list(opt.fp32_partitioned_groups_flat) + _state_tensors(opt.optimizer.state))
    else:
        params = meter(list(model.parameters()))
        grads = meter([p.grad for p in model.parameters() if p.grad is not None])
        optimizer = meter(_state_tensors(w.optimizer.state))
    fisher = meter([b for per in acc.state.buffers.values() for b in per.values()])
    return {"parameters": params, "gradients": grads, "optimizer": optimizer, "fisher": fisher}


def _one_step(rank: int, config_dir: str, backend: str) -> dict[str, int]:
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.fisher import FisherAccumulator, FisherSpec
    from fisherdist.fisher.loss import per_sample_nll

    model = _build(config_dir)
    w = wrap_model(model, backend, lambda ps: torch.optim.AdamW(ps, lr=1e-3), micro_batch_size=MB)
    acc = FisherAccumulator(w, FisherSpec(granularity="batch", params=["*"]))  # the same buffers at any granularity
    ids = torch.randint(0, model.config.vocab_size, (MB, SEQ), generator=torch.Generator().manual_seed(rank))
    with acc.record(ids):
        w.backward(per_sample_nll(w.module(input_ids=ids).logits, ids).mean())
    acc.step()
    if backend == "zero3":  # gradient partitions exist from backward on; optimizer moments after the first step
        w.step()
        return _measure(w, acc, backend)
    grads = _measure(w, acc, backend)["gradients"]  # FSDP2 frees gradients in step(): measure them before it
    w.optimizer.step()
    out = _measure(w, acc, backend)
    return {**out, "gradients": grads}


def _zero12_fragments(stage: int, config_dir: str) -> dict[str, tuple[int, int] | None]:
    """A live ZeRO-1/2 engine's ``(start, numel)`` per trainable parameter (the embedding is frozen)."""
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.fisher.backends.zero_internals import fragment_address

    model = _build(config_dir)
    model.model.embed_tokens.weight.requires_grad_(False)  # a group with a hole: frozen params are not flattened
    wrap_model(model, f"zero{stage}", lambda ps: torch.optim.AdamW(ps, lr=1e-3), micro_batch_size=MB)
    return {n: fragment_address(p) for n, p in model.named_parameters() if p.requires_grad}


def _token_batch(vocab: int, rank: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (MB, SEQ), generator=torch.Generator().manual_seed(rank))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "valid": torch.ones(MB, dtype=torch.bool)}


def _train_step(w, batch: dict[str, torch.Tensor], extra=None) -> int:
    """One recorded AdamW step; returns the gradient bytes held after backward (FSDP2 frees them in step)."""
    from fisherdist.fisher.loss import per_sample_nll

    loss = per_sample_nll(w.module(input_ids=batch["input_ids"]).logits, batch["labels"]).mean()
    w.backward(loss + (extra() if extra else 0))
    grads = _measure_grads(w)
    w.step()
    return grads


def _measure_grads(w) -> int:
    if w.backend == "zero3":
        return _Meter()([w.module.optimizer.grad_partitions_flat_buffer])
    return _Meter()([p.grad for p in w.unwrapped.parameters() if p.grad is not None])


def _held(w, extra_params: list[torch.Tensor]) -> dict[str, int]:
    """Parameters (+ packed buffers, frozen copies) and optimizer state after the step."""
    meter = _Meter()
    model = w.unwrapped
    if w.backend == "zero3":
        opt = w.module.optimizer
        params = meter([p.ds_tensor for p in model.parameters()] + extra_params)
        optimizer = meter(list(opt.fp32_partitioned_groups_flat) + _state_tensors(opt.optimizer.state))
    else:
        params = meter(list(model.parameters()) + extra_params)
        optimizer = meter(_state_tensors(w.optimizer.state))
    return {"parameters": params, "optimizer": optimizer}


def _adam(ps):
    return torch.optim.AdamW(ps, lr=1e-3)


def _load(path: str, backend: str, prepare=None):
    from fisherdist.models.sharded_load import load_wrapped

    zero = {"zero_config": {"train_micro_batch_size_per_gpu": MB}} if backend.startswith("zero") else {}
    return load_wrapped(path, torch.float32, backend, "cpu", prepare=prepare, optimizer_factory=_adam, **zero)


def _vila_fila(rank: int, path: str, backend: str) -> dict[str, dict[str, int]]:
    """One LoRA model: VILA's and FILA's importance states (each accumulator in turn), then a train step
    with the NPO reference (FrozenAdapter). Both methods hold the same model, gradients and optimizer."""
    from fisherdist.fisher import FisherAccumulator
    from fisherdist.methods.vila.importance import importance_spec, record_batch
    from fisherdist.models.peft_utils import apply_lora
    from fisherdist.recipes.losses import FrozenAdapter

    w = _load(path, backend, lambda m: apply_lora(m, LORA_ALL))
    batch = _token_batch(w.unwrapped.config.vocab_size, rank)
    fisher = {}
    for method in ("vila", "fila"):
        acc = FisherAccumulator(w, importance_spec(method, LORA_ALL))
        for state in ("forget", "retain"):
            record_batch(w, acc, batch, state)
        fisher[method] = _Meter()([b for st in acc.states.values() for per in st.buffers.values() for b in per.values()])
        acc.close()
    reference = FrozenAdapter(w.unwrapped)
    grads = _train_step(w, batch)
    held = {**_held(w, reference.saved), "gradients": grads}
    return {m: {**held, "fisher": fisher[m]} for m in ("vila", "fila")}


def _lqlora(rank: int, path: str, backend: str) -> dict[str, int]:
    """Packed NF4 base layers (QLinear buffers) + LoRA, one train step."""
    from fisherdist.methods.lqlora.train_stage import quantized_lora
    from fisherdist.models.qlinear import quantized_layers
    from fisherdist.models.quant import QConfig, quantize

    def prepare(base):
        packed = {n: quantize(p, QConfig.parse("nf4")) for n, p in base.named_parameters() if n.endswith("_proj.weight")}
        return quantized_lora(base, LORA_ALL, packed)

    w = _load(path, backend, prepare)
    grads = _train_step(w, _token_batch(w.unwrapped.config.vocab_size, rank))
    buffers = [b for q in quantized_layers(w.unwrapped).values() for b in q.buffers()]
    return {**_held(w, buffers), "gradients": grads}


def _agl(rank: int, world: int, path: str, backend: str) -> dict[str, int]:
    """The fisher stage's K-FAC factors (measured inside alignment_bases), then the agl arm's train step."""
    import fisherdist.methods.agl.fisher as agl_fisher
    from fisherdist.methods.agl.adapters import attach
    from fisherdist.methods.agl.penalty import AglWeights
    from fisherdist.methods.agl.train import AglPenalty
    from fisherdist.models.peft_utils import apply_lora
    from fisherdist.models.sharded_load import load_wrapped

    held: dict[str, int] = {}
    estimate = agl_fisher.estimate_fisher

    def measured(*args, **kwargs):
        acc = estimate(*args, **kwargs)
        held["fisher"] = _Meter()([b for per in acc.state.buffers.values() for b in per.values()])
        return acc

    agl_fisher.estimate_fisher = measured
    batch = _token_batch(5003, rank)  # both probe models share LARGER's vocabulary
    bases = agl_fisher.alignment_bases(load_wrapped(path, torch.float32, backend, "cpu"), [batch], LORA_QKVO.targets,
                                       AGL_M)
    scale = LORA_QKVO.alpha / LORA_QKVO.r
    w = _load(path, backend, lambda m: _attached(apply_lora(m, LORA_QKVO), bases, scale, attach))
    penalty = AglPenalty(w, AglWeights(), scale)
    grads = _train_step(w, batch, lambda: penalty.extra_loss(None))
    state = [b for n, b in w.unwrapped.named_buffers() if ".agl." in n]
    return {**_held(w, []), "gradients": grads, "fisher": held["fisher"], "method_state": _Meter()(state)}


def _attached(model, bases, scale, attach):
    attach(model, bases, 8, scale, 0)
    return model


def measure_all(rank: int, world: int, configs: dict[str, str]) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out: dict = {}
    for name, config_dir in _models(configs, world).items():
        for backend in BACKENDS:
            out[(name, backend)] = _one_step(rank, config_dir, backend)
    if world <= 2:  # the methods' own allocations on LARGER's weights (saved by the fixture)
        for backend in _method_backends(world):
            for method, held in _vila_fila(rank, configs["larger"], backend).items():
                out[(method, backend)] = held
        # Q is replicated on every backend and the adapter is VILA's, checked on both: FSDP2 is enough
        out[("lqlora", "fsdp2")] = _lqlora(rank, configs["larger"], "fsdp2")
        agl_backend = "none" if world == 1 else "ddp"  # the replicated route (FSDP2 / ZeRO-3: tests/test_agl_sharded.py)
        out[("agl", agl_backend)] = _agl(rank, world, configs["larger"], agl_backend)
    if world == 3:  # uneven: partitions cut through parameters at different offsets on every rank
        for stage in (1, 2):
            out[("larger", f"zero{stage}")] = _zero12_fragments(stage, configs["larger"])
    return out


def _models(configs: dict[str, str], world: int) -> dict[str, str]:
    """The tiny world's even sizes on one rank; the larger model's awkward ones (uneven shards) on every world."""
    return configs if world == 1 else {"larger": configs["larger"]}


def _method_backends(world: int) -> tuple[str, ...]:
    """VILA / FILA: FSDP2 always; ZeRO-3 where it partitions (one ZeRO-3 rank holds what FSDP2's does)."""
    return BACKENDS if world > 1 else ("fsdp2",)


def _planned(config_dir: str, backend: str, world: int, rank: int) -> dict[str, int]:
    from dataclasses import replace

    from fisherdist.plan.memory import Job, persistent
    from fisherdist.plan.methods import method_model
    from fisherdist.plan.model import load_model

    model = load_model(config_dir)
    mm = replace(method_model("fisher", model, ["*"], "sample", None), optimizer="adamw")
    return persistent(Job(model, backend, world, 4, MB, SEQ), mm, rank)


_planned = functools.lru_cache(maxsize=None)(_planned)


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("plan")
    return {name: _config_path(tmp, name) for name in ("world", "larger")}


@pytest.mark.deepspeed
@pytest.mark.timeout(1500)  # a few seconds of CPU per rank; the wall time on the shared machine is load
@pytest.mark.parametrize("world", [1, 2, 3])
def test_planner_matches_held_tensors(world, configs):
    results = run_distributed(measure_all, world, configs, timeout=1400)
    for name, config_dir in _models(configs, world).items():
        for backend in BACKENDS:
            for rank in range(world):
                planned = _planned(config_dir, backend, world, rank)
                held = results[rank][(name, backend)]
                for key, got in held.items():
                    assert got > 0, (name, backend, rank, key)
                    assert abs(planned[key] - got) <= 0.05 * got, (name, backend, world, rank, key, planned[key], got)
    if world == 3:
        _check_zero12(results, configs["larger"], world)
    else:
        _check_methods(results, configs["larger"], world)


def _check_methods(results: list[dict], config_dir: str, world: int) -> None:
    """Every method's planned component within 5% of what each rank held (DDP: gradients are not checked,
    the planner adds the reducer's bucket copy that no tensor of ours references)."""
    cases = [(m, b) for m in ("vila", "fila") for b in _method_backends(world)]
    cases += [("lqlora", "fsdp2"), ("agl", "none" if world == 1 else "ddp")]
    for method, backend in cases:
        for rank in range(world):
            planned = _planned_method(config_dir, method, backend, world, rank)
            for key, got in results[rank][(method, backend)].items():
                if backend == "ddp" and key == "gradients":
                    continue
                assert got > 0, (method, backend, rank, key)
                assert abs(planned[key] - got) <= 0.05 * got, (method, backend, world, rank, key, planned[key], got)


@functools.cache
def _planned_method(config_dir: str, method: str, backend: str, world: int, rank: int) -> dict[str, int]:
    from fisherdist.plan.memory import Job, persistent
    from fisherdist.plan.methods import method_model
    from fisherdist.plan.model import load_model

    model = load_model(config_dir)
    mm = method_model(method, model, ["*"], "sample", 8, quant_bits=NF4_BITS, subspace=AGL_M)
    return persistent(Job(model, backend, world, 4, MB, SEQ), mm, rank)


def _check_zero12(results: list[dict], config_dir: str, world: int) -> None:
    from fisherdist.plan.layout import zero12
    from fisherdist.plan.model import load_model

    shapes = load_model(config_dir).shapes
    trainable = {f: s for f, s in shapes.items() if f != "model.embed_tokens.weight"}
    for stage in (1, 2):
        for rank in range(world):
            live = results[rank][("larger", f"zero{stage}")]
            planned = zero12(trainable, rank, world)
            assert set(live) == set(trainable)
            for fqn, addr in live.items():
                assert planned.ranges[fqn][rank] == (addr if addr is not None else (0, 0)), (stage, rank, fqn)
