"""Export a trained adapter: the adapter alone (PEFT format) and the merged model (standard HF directory).

Only the trainable LoRA tensors are gathered (a few MB even at 70B); rank 0 then re-loads the frozen
base from its directory on CPU, loads the adapter into it and runs ``merge_and_unload``. The sharded base
weights are never gathered, because training does not change them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fisherdist.atomic import atomic_dir, remove, swap_in
from fisherdist.distributed.collectives import rank
from fisherdist.errors import FisherdistError
from fisherdist.models.peft_utils import LoraSettings, apply_lora


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    from transformers import AutoTokenizer

    if (Path(src) / "tokenizer_config.json").is_file() or (Path(src) / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)


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


def export_adapter(
    lora_tensors: dict[str, torch.Tensor], base_path: str | Path, lora: LoraSettings,
    adapter_dir: str | Path, merged_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
) -> None:
    """Rank 0 writes ``adapter_dir`` (``PeftModel.from_pretrained`` loads it) and the merged model."""
    if rank() != 0:
        return
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype), lora)
    own = dict(model.named_parameters())
    unknown = sorted(set(lora_tensors) - set(own))
    if unknown:
        raise FisherdistError(f"export: adapter tensors {unknown[:3]} do not exist in a fresh LoRA model of {base_path}")
    with torch.no_grad():
        for name, t in lora_tensors.items():
            own[name].copy_(t.to(own[name].dtype))
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp)
    if merged_dir is not None:
        with atomic_dir(merged_dir) as tmp:
            model.merge_and_unload().save_pretrained(tmp)
            copy_tokenizer(base_path, tmp)


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
