"""A quantized base + LoRA model directory (LQ-LoRA's ``models/lqlora/``, also fits QLoRA-style runs).

Layout: ``config.json`` and the tokenizer (a HF model directory's), ``model.safetensors`` (every base
tensor that is not quantized, HF names), ``quantized.safetensors`` (each quantized weight's packed parts
``<name>.q.codes|scale_codes|scales|offset``), ``lora.safetensors`` (the adapter factors by PEFT FQN) and
``quantized.json`` (``{"lora": {r, alpha, targets}, "matrices": {name: {"shape", "config"}}}``).
:func:`load_quantized_lora` rebuilds the PEFT model with :class:`~fisherdist.models.qlinear.QLinear` base
layers: the bytes in memory are the bytes on disk.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fisherdist.atomic import atomic_dir
from fisherdist.errors import FisherdistError
from fisherdist.models.peft_utils import LoraSettings
from fisherdist.models.quant import QuantizedTensor

META = "quantized.json"


def save_quantized_lora(out: str | Path, config_dir: str | Path, plain: Mapping[str, torch.Tensor],
                        packed: Mapping[str, QuantizedTensor], lora: Mapping[str, torch.Tensor],
                        settings: LoraSettings) -> Path:
    """Write the directory atomically (temp sibling, then rename); call on one rank."""
    from transformers import AutoConfig

    from fisherdist.models.export import copy_tokenizer

    q = {k: v for name, qt in packed.items() for k, v in qt.to_tensors(f"{name}.q").items()}
    meta = {"lora": {"r": settings.r, "alpha": settings.alpha, "targets": list(settings.targets)},
            "matrices": {n: {"shape": list(qt.shape), "config": qt.config.name} for n, qt in sorted(packed.items())}}
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in plain.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(q, str(tmp / "quantized.safetensors"))
        save_file({k: v.contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        AutoConfig.from_pretrained(config_dir).save_pretrained(tmp)
        copy_tokenizer(config_dir, tmp)
    return Path(out)


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FisherdistError(f"{path}: not a quantized LoRA directory ({e})") from None
    return meta


def read_packed_dir(folder: str | Path) -> dict[str, QuantizedTensor]:
    """Every packed weight of the directory, by HF weight name."""
    from fisherdist.models.qlinear import read_packed

    with safe_open(str(Path(folder) / "quantized.safetensors"), framework="pt") as f:
        return read_packed(f.get_tensor, read_meta(folder)["matrices"])


def load_quantized_lora(folder: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The PEFT model (eval mode) with packed base layers and the saved adapter."""
    from safetensors.torch import load_file

    from fisherdist.models.peft_utils import apply_lora
    from fisherdist.models.qlinear import quantize_base_layers
    from fisherdist.models.sharded_load import build_empty, to_empty_keep_buffers

    folder = Path(folder)
    lora = read_meta(folder)["lora"]
    model = to_empty_keep_buffers(build_empty(folder, dtype), "cpu")  # no random init of a large model
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    packed = read_packed_dir(folder)
    if unexpected or set(missing) - set(packed):
        raise FisherdistError(f"{folder}: tensors do not fit the architecture (missing "
                              f"{sorted(set(missing) - set(packed))[:3]}, unexpected {unexpected[:3]})")
    peft = apply_lora(model, LoraSettings(r=lora["r"], alpha=lora["alpha"], dropout=0.0, targets=lora["targets"]))
    done = quantize_base_layers(peft, packed)
    if set(done) != set(packed):
        raise FisherdistError(f"{folder}: quantized weights without a LoRA layer: {sorted(set(packed) - set(done))[:3]}")
    own = dict(peft.named_parameters())
    with torch.no_grad():
        for name, t in load_file(str(folder / "lora.safetensors")).items():
            own[name].copy_(t.to(own[name].dtype))
    return peft.eval()
