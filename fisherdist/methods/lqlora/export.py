"""LQ-LoRA's files: the decomposition folder (``index.json`` + ``part-*.safetensors`` by matrix name), the
dense HF directories (dequantized Q + low-rank, before and after fine-tuning) and the measured bits.

A dense directory is the base checkpoint rewritten one source shard at a time
(:func:`fisherdist.models.export.rewrite_checkpoint`), each decomposed matrix replaced.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fisherdist.errors import FisherdistError
from fisherdist.models.load import model_dir
from fisherdist.models.quant import QConfig, QuantizedTensor


class Decomposition:
    """Read access to a ``lqlora decompose`` folder: Q (packed), L1 and L2 of any matrix, by name."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / "index.json").read_text())
        except (OSError, ValueError) as e:
            raise FisherdistError(f"{self.folder}/index.json: no decomposition (run `lqlora decompose` first): {e}") from None
        self.rank: int = int(index["rank"])
        self.matrices: dict[str, dict[str, Any]] = index["matrices"]

    def _get(self, name: str, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        with safe_open(str(self.folder / self.matrices[name]["file"]), framework="pt") as f:
            return {k: f.get_tensor(f"{name}.{k}") for k in keys}

    def packed(self, name: str) -> QuantizedTensor:
        e = self.matrices[name]
        parts = self._get(name, [f"q.{k}" for k in ("codes", "scale_codes", "scales", "offset")])
        return QuantizedTensor.from_tensors(lambda k: parts[k.removeprefix(f"{name}.")], f"{name}.q",
                                            tuple(e["shape"]), QConfig.parse(e["config"]))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._get(name, ["l1", "l2"])
        return t["l1"], t["l2"]

    def dense(self, name: str) -> torch.Tensor:
        """Q + L1 L2, formed in float64 (the writer casts it to the model's dtype)."""
        l1, l2 = self.factors(name)
        return self.packed(name).dequantize(torch.float64) + l1.double() @ l2.double()


def plain_tensors(src: str | Path, skip: Iterable[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the HF checkpoint ``src`` except ``skip`` (the quantized ones)."""
    skip = set(skip)
    out = {}
    for file in sorted(model_dir(src).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys() if n not in skip})
    return out


def bits_report(packed: Mapping[str, QuantizedTensor], rank: int) -> dict[str, float]:
    """Measured bits per parameter of the quantized part (packed bytes x 8 / parameters), with and without
    the 16-bit rank-r factors, and the nominal storage formula's average."""
    numel = sum(q.numel for q in packed.values())
    lowrank = sum(rank * sum(q.shape) for q in packed.values())
    measured = 8 * sum(q.nbytes for q in packed.values()) / numel
    nominal = sum(q.numel * q.config.bits_per_param() for q in packed.values()) / numel
    return {"bits_per_param": measured, "bits_per_param_with_lowrank": measured + 16 * lowrank / numel,
            "bits_per_param_nominal": nominal, "quantized_params": numel, "lowrank_params": lowrank}
