"""LoRA on a sharded model: custom factors, folding s*B*A into the frozen base, and a streamed export.

Methods such as FILA/VILA and LQ-LoRA start from A0, B0 of their own and rewrite the frozen base to
W - s*B0*A0, so that the adapted model starts equal to the original. Here every rank changes only the
part of W it holds (an FSDP2 row shard, a ZeRO-3 flat partition, or the whole tensor); only the small
factors are gathered. The export gathers one parameter at a time and rank 0 writes it to safetensors
shards as they fill, so no rank ever holds the model whole.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fisherdist.atomic import atomic_dir
from fisherdist.distributed.collectives import barrier, rank
from fisherdist.models.peft_utils import AdaptedModule, adapted_modules
from fisherdist.models.sharded_load import checkpoint_name

Factors = Callable[[AdaptedModule], "tuple[torch.Tensor, torch.Tensor] | None"]


def _view(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's storage of ``p`` as a flat tensor, its first flat index in the full tensor)."""
    if hasattr(p, "ds_tensor"):  # ZeRO-3: partition i holds flat[i*n : (i+1)*n], the last one padded
        from fisherdist.distributed.collectives import rank_world

        local = p.ds_tensor.data.view(-1)
        return local, rank_world()[0] * local.numel()
    if hasattr(p, "to_local"):  # FSDP2: a Shard(0) chunk of ceil(rows / world) rows
        local = p.to_local()
        chunk = math.ceil(p.shape[0] / p.device_mesh.size())
        first = min(p.device_mesh.get_local_rank() * chunk, p.shape[0])
        return local.view(-1), first * math.prod(p.shape[1:])
    return p.data.view(-1), 0


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """The full shape (a ZeRO-3 parameter's own ``.shape`` is empty while it is partitioned)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _owned(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(flat local storage, first flat index, how many of its elements are real, not padding)."""
    local, lo = _view(p)
    return local, lo, max(0, min(local.numel(), math.prod(_shape(p)) - lo))


def full_value(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (small) parameter, on every rank (collective for sharded ones)."""
    if hasattr(p, "full_tensor"):
        return p.full_tensor().detach()
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.data.detach().clone()
    return p.detach()


@torch.no_grad()
def write_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """Copy this rank's part of the full ``value`` into ``p`` (every rank passes the same value)."""
    local, lo, n = _owned(p)
    local[:n].copy_(value.reshape(-1)[lo : lo + n].to(local.dtype))


@torch.no_grad()
def add_rows(p: torch.Tensor, rows: Callable[[int, int], torch.Tensor]) -> None:
    """``p += delta`` where ``rows(r0, r1)`` returns rows ``r0:r1`` of the full 2-D delta; only the rows
    this rank holds are ever formed."""
    local, lo, n = _owned(p)
    if n == 0:
        return
    width = _shape(p)[1]
    r0, r1 = lo // width, (lo + n - 1) // width + 1
    flat = rows(r0, r1).reshape(-1)
    local[:n].add_(flat[lo - r0 * width : lo - r0 * width + n].to(local.dtype))


def owned_rows(p: torch.Tensor) -> tuple[int, torch.Tensor, bool]:
    """(first row r0, the full rows r0.. this rank holds part of, zero where it holds nothing, whether ``p``
    is sharded): summing products of these blocks over ranks gives the full matrix's (each element is
    owned once), so a method can multiply a sharded 2-D weight by small matrices without gathering it."""
    local, lo, n = _owned(p)
    width = _shape(p)[1]
    sharded = hasattr(p, "ds_tensor") or hasattr(p, "to_local")
    if n == 0:
        return 0, local.new_zeros((0, width)), sharded
    r0, r1 = lo // width, (lo + n - 1) // width + 1
    block = local.new_zeros((r1 - r0) * width)
    block[lo - r0 * width : lo - r0 * width + n] = local[:n]
    return r0, block.view(r1 - r0, width), sharded


def set_factors(model: nn.Module, factors: Factors) -> None:
    """Give each adapted module the full ``(A, B)`` that ``factors`` returns (``None``: keep its own);
    every rank must compute the same values (call it on all ranks, in module order)."""
    for m in adapted_modules(model):
        ab = factors(m)
        if ab is not None:
            write_full(m.lora_a, ab[0])
            write_full(m.lora_b, ab[1])


def scaling(m: AdaptedModule) -> float:
    return float(m.module.scaling["default"])


def fold_into_base(model: nn.Module, sign: float = -1.0) -> None:
    """W <- W + sign * s * B @ A for every adapted module (default: W - s*B*A, so the adapted model equals
    the original one); the factors are gathered, W never is."""
    for m in adapted_modules(model):
        _fold_one(m, sign)


def _fold_one(m: AdaptedModule, sign: float) -> None:
    a, b, s = full_value(m.lora_a).double(), full_value(m.lora_b).double(), sign * scaling(m)
    add_rows(m.module.base_layer.weight, lambda r0, r1: (b[r0:r1] @ a) * s)


def lora_tensors(model: nn.Module, owns: Callable[[str], bool] = lambda fqn: ".lora_" in fqn) -> dict[str, torch.Tensor]:
    """Full copies of every LoRA factor (or of every parameter ``owns`` names), keyed by parameter FQN
    (collective; a few MB even at 70B)."""
    return {n: full_value(p).cpu().clone() for n, p in model.named_parameters() if owns(n)}


@dataclass(frozen=True)
class ExtraDelta:
    """A method's own update of the adapted weights beyond PEFT's s*B*A (AlignGuard-LoRA's second adapter):
    ``owns(fqn)`` names its parameters (small; never written as base tensors, gathered whole for the merge)
    and ``delta(module, gathered)`` is its dense (d_out, d_in) update of one adapted module, formed on the
    writing rank from those gathered tensors (one module at a time)."""

    owns: Callable[[str], bool]
    delta: Callable[[AdaptedModule, dict[str, torch.Tensor]], torch.Tensor]


class ShardWriter:
    """safetensors files of about ``shard_bytes`` each, written as they fill, plus the HF index."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t.contiguous()
        self.total += t.numel() * t.element_size()
        if sum(x.numel() * x.element_size() for x in self.pending.values()) >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / file), metadata={"format": "pt"})
        self.weight_map.update({k: file for k in self.pending})
        self.pending = {}

    def close(self, metadata: dict[str, Any] | None = None) -> None:
        """Write the last shard and the index (``metadata``: what the tensors mean, kept in the index)."""
        self.flush()
        index = {"metadata": {"total_size": self.total, **(metadata or {})}, "weight_map": self.weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _merged_fn(model: nn.Module, lora: dict[str, torch.Tensor],
               extra: ExtraDelta | None) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """fqn, full W -> W + s*B*A for adapted base weights (as PEFT's merge, in W's dtype), or with the extra
    delta W + (s*B*A + delta) in at least float32, rounded once; W otherwise."""
    by_weight = {m.base_weight_fqn: m for m in adapted_modules(model)}

    def merge(fqn: str, w: torch.Tensor) -> torch.Tensor:
        if fqn not in by_weight:
            return w
        m = by_weight[fqn]
        a, b = lora[f"{m.name}.lora_A.default.weight"], lora[f"{m.name}.lora_B.default.weight"]
        if extra is None:
            return w + (b.to(w.dtype) @ a.to(w.dtype)) * scaling(m)
        wide = torch.promote_types(w.dtype, torch.float32)  # both deltas summed wide, one rounding (bf16)
        delta = (b.to(wide) @ a.to(wide)) * scaling(m) + extra.delta(m, lora).to(wide)
        return (w.to(wide) + delta).to(w.dtype)

    return merge


@contextlib.contextmanager
def rank0_dir(out: Path) -> Iterator[Path | None]:
    """Rank 0: a temporary sibling of ``out`` swapped in on success (``atomic_dir``); other ranks: None."""
    if rank() != 0:
        yield None
        return
    with atomic_dir(out) as tmp:
        yield tmp


def export_base(model: nn.Module, config_dir: str | Path, out: str | Path, merge: bool,
                shard_bytes: int = 2 << 30, extra: ExtraDelta | None = None) -> Path:
    """The base as it is now (rewritten or not) as a HF directory, or (``merge``) with s*B*A (and
    ``extra``'s delta) added.

    Collective: every rank gathers one parameter at a time; rank 0 writes shards of ``shard_bytes``;
    ``config_dir`` (the original model) provides config.json and the tokenizer."""
    from fisherdist.models.export import copy_tokenizer

    def adapter(fqn: str) -> bool:
        return ".lora_" in fqn or (extra is not None and extra.owns(fqn))

    lora = lora_tensors(model, adapter) if merge else {}
    fn = _merged_fn(model, lora, extra) if merge else (lambda _fqn, w: w)
    with rank0_dir(Path(out)) as tmp:
        writer = ShardWriter(tmp, shard_bytes) if tmp is not None else None
        for fqn, p in model.named_parameters():
            if adapter(fqn):
                continue
            full = full_value(p)
            if writer is not None:
                writer.add(checkpoint_name(fqn), fn(fqn, full.cpu()))
        if writer is not None and tmp is not None:
            writer.close()
            _copy_config(config_dir, tmp)
            copy_tokenizer(config_dir, tmp)
    barrier()
    return Path(out)


def _copy_config(src: str | Path, dst: Path) -> None:
    from transformers import AutoConfig

    AutoConfig.from_pretrained(src).save_pretrained(dst)


def save_adapter(model: nn.Module, out: str | Path, base_dir: str | Path) -> Path:
    """The live adapter as a PEFT directory (``PeftModel.from_pretrained(base_dir, out)`` loads it).
    Collective: the factors are gathered (small); rank 0 writes."""
    import copy

    from safetensors.torch import save_file

    tensors = {n.replace(".default.", "."): t.contiguous() for n, t in lora_tensors(model).items()}
    with rank0_dir(Path(out)) as tmp:
        if tmp is not None:
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            config = copy.copy(model.peft_config["default"])
            config.base_model_name_or_path = str(base_dir)
            config.save_pretrained(str(tmp))
    barrier()
    return Path(out)
