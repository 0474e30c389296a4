"""Load a large HF model straight into FSDP2 shards: every rank reads only its own rows from disk.

``from_pretrained`` on every rank needs a full copy per process (140 GB at 70B in bf16, times 8 ranks per
node). Here the architecture is built with its *parameters* on the meta device (buffers such as the
rotary ``inv_freq`` stay real; accelerate's ``init_empty_weights``), adapted (LoRA) and wrapped with
``fully_shard``; then each rank allocates its local shards and copies its rows out of the memory-mapped
safetensors files (``get_slice`` reads only those bytes). Parameters that the checkpoint lacks are either
PEFT's LoRA factors, initialised on CPU from a generator seeded by their name, identically on every rank, as
PEFT initialises them (A: Kaiming-uniform, B: zeros), or a method's own adapter that ``prepare`` created
with real values (small, e.g. AlignGuard-LoRA's C and A_a): each rank keeps its shard of those, so they
equal the full load's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fisherdist.errors import FisherdistError
from fisherdist.models.load import model_dir, to_dtype

PEFT_PREFIX = "base_model.model."


def build_empty(path: str | Path, dtype: str | torch.dtype) -> nn.Module:
    """The causal LM of ``path`` with parameters on the meta device and real buffers (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir(path)), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=to_dtype(dtype))
    return model


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (sharded ``*.index.json`` or one ``model.safetensors``)."""
    return safetensors_files(model_dir(path))


def safetensors_files(p: Path) -> dict[str, Path]:
    """:func:`checkpoint_files` of any folder of safetensors (no config.json needed: e.g. a saved Fisher)."""
    index = p / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: p / file for name, file in weight_map.items()}
    single = p / "model.safetensors"
    if not single.is_file():
        raise FisherdistError(f"{p}: model.load=sharded needs safetensors weights (model.safetensors or an index)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def checkpoint_name(fqn: str) -> str:
    """Parameter name in a (PEFT-wrapped) model -> its name in the HF checkpoint."""
    name = fqn[len(PEFT_PREFIX):] if fqn.startswith(PEFT_PREFIX) else fqn
    return name.replace(".base_layer.", ".")


def initial_value(fqn: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Full CPU initial value of a parameter absent from the checkpoint (LoRA A / B), the same on every rank."""
    if ".lora_B." in fqn:
        return torch.zeros(shape)
    if ".lora_A." not in fqn:
        raise FisherdistError(f"parameter {fqn} is neither in the checkpoint nor a LoRA factor")
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{fqn}".encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(digest)
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) of a (r, d_in) weight, as PEFT uses
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def _local_rows(param: Any) -> tuple[torch.Tensor, int, int]:
    """(writable local tensor, first row, rows) of a parameter: FSDP2's Shard(0) chunk, or everything."""
    if not hasattr(param, "to_local"):
        return param.data, 0, param.shape[0]
    local = param.to_local()
    rank, world = param.device_mesh.get_local_rank(), param.device_mesh.size()
    chunk = math.ceil(param.shape[0] / world)
    return local, min(rank * chunk, param.shape[0]), local.shape[0]


@torch.no_grad()
def to_empty_keep_buffers(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model.to_empty(device)`` with the buffers (rotary frequencies, computed at construction, never in a
    checkpoint) kept: to_empty would leave them uninitialised too."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    for n, b in model.named_buffers():
        b.copy_(buffers[n])
    return model


def _real_shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """Local shards of the parameters that are not on the meta device (created with values by ``prepare``,
    a method's own small adapter): ``to_empty`` would discard them."""
    out = {}
    for fqn, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not local.is_meta:
            out[fqn] = local.detach().clone()
    return out


@torch.no_grad()
def materialize(model: nn.Module, path: str | Path, device: torch.device | str, seed: int = 0) -> None:
    """Allocate every local shard on ``device`` and fill it from ``path`` (after ``fully_shard``); parameters
    absent from the checkpoint keep the values they already had, except LoRA factors (always the
    name-seeded init, whatever device PEFT built them on)."""
    from safetensors import safe_open

    kept = _real_shards(model)
    to_empty_keep_buffers(model, device)
    files = checkpoint_files(path)
    handles: dict[Path, Any] = {}
    for fqn, param in model.named_parameters():
        local, r0, rows = _local_rows(param)
        name = checkpoint_name(fqn)
        if name in files:
            f = handles.setdefault(files[name], safe_open(str(files[name]), framework="pt"))
            value = f.get_slice(name)[r0 : r0 + rows]
        elif fqn in kept and ".lora_" not in fqn:
            value = kept[fqn]
        else:
            value = initial_value(fqn, tuple(param.shape), seed)[r0 : r0 + rows]
        if tuple(value.shape) != tuple(local.shape):
            raise FisherdistError(f"{path}: tensor {name} has rows of shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(local.shape)} (a different architecture?)")
        local.copy_(value)


@torch.no_grad()
def _init_lora(model: nn.Module, seed: int) -> None:
    """The same LoRA initial values as the FSDP2 sharded path, on every rank (whole, not yet partitioned)."""
    for fqn, p in model.named_parameters():
        if ".lora_" in fqn:
            p.copy_(initial_value(fqn, tuple(p.shape), seed))


def load_wrapped(path: str | Path, dtype: str | torch.dtype, backend: str, device: torch.device | str, *,
                 load: str = "full", prepare: Callable[[nn.Module], nn.Module] | None = None,
                 optimizer_factory: Any = None, seed: int = 0, lora_init: Callable[[nn.Module], None] | None = None,
                 **options: Any) -> Any:
    """Model of ``path`` -> ``prepare`` (e.g. add LoRA) -> wrapped for ``backend`` (+ optimizer).

    ``lora_init(model)`` runs on every rank after the default LoRA initial values are in place and before
    the optimizer sees the factors (DeepSpeed copies them into its own master weights): a method's own
    A/B and base rewrite (see :mod:`fisherdist.models.lora_base`), on whatever sharding the model has then.

    ``load="full"``: every rank loads the whole model, then wraps it. ``load="sharded"``: with FSDP2 the
    model is wrapped empty and each rank reads just its rows (see the module docstring); with ZeRO-3 the
    model is partitioned while it loads (transformers' ``HfDeepSpeedConfig``, DeepSpeed's ``zero.Init``).
    """
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.models.load import load_model

    prepare = prepare or (lambda m: m)
    init = lora_init or (lambda m: None)
    if load == "sharded" and backend == "zero3":
        from fisherdist.distributed.wrap_deepspeed import load_partitioned

        model = prepare(load_partitioned(lambda: load_model(path, dtype), to_dtype(dtype), **options))
        _init_lora(model, seed)
        init(model)
        for p in model.parameters():  # the adapter's new tensors; partitioned ones already sit on the device
            if not hasattr(p, "ds_id"):
                p.data = p.data.to(device)
        return wrap_model(model, backend, optimizer_factory=optimizer_factory, **options)
    if load == "full":
        model = prepare(load_model(path, dtype))
        _init_lora(model, seed)
        init(model)
        return wrap_model(model.to(device), backend, optimizer_factory=optimizer_factory, **options)
    if backend != "fsdp2":
        raise FisherdistError(f"model.load=sharded needs dist.backend=fsdp2 or zero3, got {backend}")
    model = prepare(build_empty(path, dtype))
    wrapped = wrap_model(model, backend, **options)
    materialize(model, path, device, seed)
    init(model)
    if optimizer_factory is not None:
        wrapped.optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    return wrapped


def load_for_generation(path: str | Path, dtype: str | torch.dtype, device: torch.device | str, load: str = "full",
                        backend: str = "none") -> Any:
    """An eval-mode model to generate with: a full copy per rank, or one copy sharded over the ranks, which
    run it together (our generator makes the same forward calls on every rank): FSDP2 row shards with
    ``load="sharded"``, else ZeRO-3 partitions when the run's ``backend`` is ZeRO-3."""
    shard = "fsdp2" if load == "sharded" else ("zero3" if backend == "zero3" else "none")
    model = load_wrapped(path, dtype, shard, device, load=load).module
    model.eval()  # (DeepSpeed's engine.eval() returns None)
    return model
