"""Export a trained LoRA run: ``models/base`` (copy or link of the original, or the rewritten base as
trained), the adapter alone (PEFT format) and the merged model (standard HF directory).

Streamed (:mod:`fisherdist.models.lora_base`): every rank gathers one parameter at a time and rank 0
writes safetensors shards as they fill, so no rank ever holds the model whole, even at 70B.
:func:`rewrite_checkpoint` writes a HF directory with some tensors replaced (LQ-LoRA's dequantized
Q + L1 L2), one source shard at a time.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from fisherdist.atomic import atomic_dir, remove, swap_in
from fisherdist.distributed.collectives import rank


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    from transformers import AutoTokenizer

    if (Path(src) / "tokenizer_config.json").is_file() or (Path(src) / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)


Replace = Callable[[str, torch.Tensor], torch.Tensor]
"""(tensor name, tensor) -> the tensor to write in its place."""


def rewrite_checkpoint(src: str | Path, out: str | Path, replace: Replace, dtype: torch.dtype) -> Path:
    """``out``: the HF directory ``src`` with every tensor passed through ``replace(name, tensor)`` and
    cast to ``dtype`` (floating tensors only), one source shard at a time (same file names and index), so
    the writer never holds the whole model; written atomically, call on one rank."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from fisherdist.models.load import model_dir

    src = model_dir(src)
    with atomic_dir(out) as tmp:
        for file in sorted(src.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                tensors = {n: _cast(replace(n, f.get_tensor(n)), dtype) for n in f.keys()}
            save_file(tensors, str(tmp / file.name), metadata={"format": "pt"})
        for index in src.glob("*.safetensors.index.json"):
            shutil.copy2(index, tmp / index.name)
        AutoConfig.from_pretrained(src).save_pretrained(tmp)
        copy_tokenizer(src, tmp)
    return Path(out)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()


def save_base_copy(base_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                   mode: str = "copy") -> Path:
    """``models/base`` next to the unlearned model (rank 0 only): a full HF copy in ``dtype``, or
    (``mode="link"``, for 70B-size bases) a symlink to the original directory."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if rank() != 0:
        return out
    if mode == "link":
        tmp = out.with_name(f".{out.name}.tmp")
        remove(tmp)
        tmp.symlink_to(Path(base_path).resolve(), target_is_directory=True)
        return swap_in(tmp, out)
    with atomic_dir(out) as tmp:
        AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).save_pretrained(tmp)
        copy_tokenizer(base_path, tmp)
    return out


def export_lora(model: torch.nn.Module, base_path: str | Path, models: Path, merged_name: str, *,
                rewritten: bool = False, dtype: torch.dtype = torch.float32, base_copy: str = "copy") -> None:
    """A trained LoRA run, streamed (no rank holds the model whole): ``models/base`` (the base as trained:
    a copy / link of ``base_path``, or, when the run rewrote it (``rewritten``), the live weights),
    ``models/adapter`` (PEFT, on top of ``models/base``) and ``models/<merged_name>`` (base + s*B*A).
    Collective on every rank."""
    from fisherdist.distributed.collectives import barrier
    from fisherdist.models.lora_base import export_base, save_adapter

    if rewritten:
        export_base(model, base_path, models / "base", merge=False)
    else:
        save_base_copy(base_path, models / "base", dtype, base_copy)
        barrier()
    save_adapter(model, models / "adapter", models / "base")
    export_base(model, base_path, models / merged_name, merge=True)
