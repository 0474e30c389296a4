"""bitsandbytes NF4 <-> :class:`~fisherdist.models.quant.QuantizedTensor`, where the formats coincide.

bitsandbytes' NF4 without nested statistics (``compress_statistics=False``) is exactly our ``nf4-fp32-B0``:
the same levels, nearest-level codes packed two per byte with the first in the high nibble, and one float32
absmax per block. Its nested (double) quantization (mean shift + 8-bit dynamic map) differs from LQ-LoRA's
(minimum shift + unsigned b0-bit integers), so those states are refused rather than converted approximately.
"""

from __future__ import annotations

import torch
from bitsandbytes.functional import QuantState

from fisherdist.models.quant import QConfig, QuantizedTensor, nf_levels


def from_bnb(packed: torch.Tensor, state: QuantState) -> QuantizedTensor:
    """Wrap bitsandbytes' ``quantize_4bit(..., quant_type="nf4", compress_statistics=False)`` output."""
    if state.quant_type != "nf4" or state.nested:
        raise ValueError(f"only plain NF4 converts (got quant_type={state.quant_type}, nested={state.nested})")
    cfg = QConfig(4, int(state.blocksize), None, "fp32", None)
    empty = torch.empty(0, device=packed.device)
    return QuantizedTensor(tuple(state.shape), cfg, packed.reshape(-1), empty.to(torch.uint8),
                           state.absmax.to(torch.float32), empty.to(torch.float32))


def to_bnb(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, QuantState]:
    """(packed, state) that ``bitsandbytes.functional.dequantize_4bit`` reads; ``nf4-fp32-B0`` only."""
    cfg = qt.config
    if cfg.bits != 4 or cfg.scale_bits is not None or cfg.scale_dtype != "fp32":
        raise ValueError(f"{cfg.name} has no bitsandbytes equivalent: need nf4 with plain fp32 scales")
    state = QuantState(absmax=qt.scales, shape=torch.Size(qt.shape), code=nf_levels(4).to(qt.codes.device),
                       blocksize=cfg.block0, quant_type="nf4", dtype=dtype)
    return qt.codes.view(-1, 1), state
