"""A linear layer whose frozen weight is a packed NF-b tensor, dequantized in every forward.

The packed parts are registered as uint8 *buffers* (the float scales are stored as their raw bytes), so
no wrapper treats them as parameters: FSDP2 shards only parameters and leaves them replicated, ZeRO's
optimizer never sees them, DDP does not reduce them, and ``model.half()`` / ``bfloat16()`` (DeepSpeed's
precision switch) cannot cast them, because casts skip integer tensors. Every rank holds the whole Q
(LQ-LoRA's 70B at 2.75 bits is about 24 GB), as the official code does under DDP.

:func:`quantize_base_layers` swaps the base layer under each PEFT LoRA layer for one of these, so PEFT's
forward (``base_layer(x) + s * B(A(x))``) runs unchanged on top of the quantized weight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fisherdist.models.quant import SCALE_DTYPES, QConfig, QuantizedTensor

PARTS = ("codes", "scale_codes", "scales", "offset")


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class QLinear(nn.Module):
    """``y = x Q^T + bias`` with Q packed (see the module docstring); nothing in it is trainable."""

    codes: torch.Tensor
    scale_codes: torch.Tensor
    scales: torch.Tensor
    offset: torch.Tensor

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"QLinear needs a 2-D weight, got shape {q.shape}")
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        self.config = q.config
        for name, t in q.tensors().items():
            self.register_buffer(name, _as_bytes(t))
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def quantized(self) -> QuantizedTensor:
        """The packed tensor, its float parts viewed back from their bytes (no copy)."""
        scales_dtype = SCALE_DTYPES[self.config.scale_dtype]
        return QuantizedTensor((self.out_features, self.in_features), self.config, self.codes, self.scale_codes,
                               self.scales.view(scales_dtype), self.offset.view(torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized Q in float32 (read-only; for code that inspects ``base_layer.weight``)."""
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized().dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, config={self.config.name}"


def quantize_base_layers(model: nn.Module, packed: Mapping[str, QuantizedTensor]) -> list[str]:
    """Replace the base layer of every LoRA layer whose weight (by checkpoint name, e.g.
    ``model.layers.0.self_attn.q_proj.weight``) is in ``packed``; returns the names replaced."""
    from fisherdist.models.peft_utils import adapted_modules
    from fisherdist.models.sharded_load import checkpoint_name

    done = []
    for m in adapted_modules(model):
        name = checkpoint_name(m.base_weight_fqn)
        if name not in packed:
            continue
        base: nn.Linear = m.module.base_layer  # type: ignore[assignment]
        q = packed[name]
        if tuple(q.shape) != (base.out_features, base.in_features):
            raise ValueError(f"{name}: packed shape {tuple(q.shape)} != layer ({base.out_features}, {base.in_features})")
        m.module.base_layer = QLinear(q, base.bias)
        done.append(name)
    return done


def quantized_layers(model: nn.Module) -> dict[str, QLinear]:
    """Every :class:`QLinear` of ``model`` by module FQN."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}


def read_packed(get: Callable[[str], torch.Tensor], entries: Mapping[str, Mapping[str, object]]) -> dict[str, QuantizedTensor]:
    """``{name: QuantizedTensor}`` from safetensors entries ``<name>.q.codes`` ... and an index
    ``{name: {"shape": [out, in], "config": "nf3-..."}}``."""
    out = {}
    for name, e in entries.items():
        dims = e["shape"]
        assert isinstance(dims, (list, tuple))
        shape = tuple(int(s) for s in dims)
        out[name] = QuantizedTensor.from_tensors(get, f"{name}.q", shape, QConfig.parse(str(e["config"])))
    return out
