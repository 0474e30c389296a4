"""NF-b blockwise quantization with double-quantized scales and real packed storage (LQ-LoRA's quantizer).

A weight is cut into blocks of B0 elements; each element becomes the index of the nearest of 2**b
Normal-quantile levels on [-1, 1] (NF-b) after dividing by its block's absmax. With double quantization
the B0-block absmaxes are shifted by their global minimum and stored as b0-bit unsigned integers, with one
absmax per B1 of them kept in dtype b1 (LQ-LoRA's scheme; QLoRA's mean-shift + FP8 scheme differs). Without
it, the absmaxes are stored directly in dtype b1 (bitsandbytes' NF4 with ``compress_statistics=False``).

Storage is real: :class:`QuantizedTensor` holds packed bytes whose size is :func:`storage_nbytes`, i.e.
``numel * (b + b0/B0 + b1/(B0*B1))`` bits plus the padding of the last block and byte group and the 4-byte
offset. Nominal bits per parameter (what the ILP budgets) come from :meth:`QConfig.bits_per_param`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fisherdist.models.packbits import group, pack, packed_nbytes, unpack

NF_OFFSET = 0.9677083
"""Outermost quantile of the NF levels (QLoRA's and LQ-LoRA's constant)."""

SCALE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAME = re.compile(r"^nf(\d)-(?:(\d)bit-)?(bf16|fp16|fp32)-(\d+)(?:x(\d+))?$")


@dataclass(frozen=True)
class QConfig:
    """b (``bits``), B0 (``block0``), b0 (``scale_bits``, None: no double quantization), b1, B1."""

    bits: int
    block0: int
    scale_bits: int | None = 8
    scale_dtype: str = "fp32"
    block1: int | None = 256

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8) or self.block0 < 1 or self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"bad quantization config {self}: bits in 2,3,4,8, block0 >= 1, dtype in "
                             f"{sorted(SCALE_DTYPES)}")
        if (self.scale_bits is None) != (self.block1 is None) or (
                self.scale_bits is not None and not (1 <= self.scale_bits <= 8 and (self.block1 or 0) >= 1)):
            raise ValueError(f"bad quantization config {self}: scale_bits in 1..8 with block1 >= 1, or both None")

    @property
    def name(self) -> str:
        """``nf4-8bit-fp32-64x256`` (double-quantized) or ``nf4-fp32-64`` (plain scales)."""
        if self.scale_bits is None:
            return f"nf{self.bits}-{self.scale_dtype}-{self.block0}"
        return f"nf{self.bits}-{self.scale_bits}bit-{self.scale_dtype}-{self.block0}x{self.block1}"

    @classmethod
    def parse(cls, name: str) -> QConfig:
        if name in ALIASES:
            return ALIASES[name]
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f"quantization config {name!r}: expected e.g. nf4-8bit-fp32-64x256, nf4-fp32-64, "
                             f"or one of {sorted(ALIASES)}")
        b, b0, b1, B0, B1 = m.groups()
        if (b0 is None) != (B1 is None):
            raise ValueError(f"quantization config {name!r}: give both the scale bits and block1, or neither")
        return cls(int(b), int(B0), None if b0 is None else int(b0), b1, None if B1 is None else int(B1))

    def bits_per_param(self) -> float:
        """LQ-LoRA's storage formula, b + b0/B0 + b1/(B0 B1) (b + b1/B0 without double quantization)."""
        b1 = torch.finfo(SCALE_DTYPES[self.scale_dtype]).bits
        if self.scale_bits is None:
            return self.bits + b1 / self.block0
        return self.bits + self.scale_bits / self.block0 + b1 / (self.block0 * (self.block1 or 1))


ALIASES = {"nf3": QConfig(3, 64), "nf4": QConfig(4, 64)}
"""QLoRA's NF3 / NF4 in LQ-LoRA's naming (b0 = 8, fp32, B0 = 64, B1 = 256: 3.127 / 4.127 bits)."""


@functools.cache
def nf_levels(bits: int) -> torch.Tensor:
    """The 2**bits NF levels, ascending, in float32: 2**(b-1) Normal quantiles on [1-offset, 0.5] and
    2**(b-1)+1 on [0.5, offset], the shared 0.5 counted once, scaled so the outermost are -1 and 1."""
    half = 2 ** (bits - 1)
    left = torch.linspace(1 - NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1]
    right = torch.linspace(0.5, NF_OFFSET, half + 1, dtype=torch.float64)
    quantiles = torch.cat([left, right])
    outer: torch.Tensor = torch.special.ndtri(torch.tensor(NF_OFFSET, dtype=torch.float64))
    levels: torch.Tensor = torch.special.ndtri(quantiles) / outer
    return levels.to(torch.float32)


def storage_nbytes(numel: int, cfg: QConfig) -> int:
    """Bytes of a packed tensor: codes, scale codes and second-level scales, each padded to whole byte groups
    and blocks, plus the float32 offset of the scale codes."""
    n0 = -(-numel // cfg.block0)
    b1 = torch.finfo(SCALE_DTYPES[cfg.scale_dtype]).bits // 8
    if cfg.scale_bits is None:
        return packed_nbytes(numel, cfg.bits) + n0 * b1
    n1 = -(-n0 // (cfg.block1 or 1))
    return packed_nbytes(numel, cfg.bits) + packed_nbytes(n0, cfg.scale_bits) + n1 * b1 + 4


@dataclass
class QuantizedTensor:
    """A packed NF-b tensor: ``codes`` (uint8), ``scale_codes`` (uint8, empty without double quantization),
    ``scales`` (dtype b1: per-B1 absmax of the shifted scales, or the B0 absmaxes themselves), ``offset``
    (float32 [1], empty without double quantization)."""

    shape: tuple[int, ...]
    config: QConfig
    codes: torch.Tensor
    scale_codes: torch.Tensor
    scales: torch.Tensor
    offset: torch.Tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored parts by name (safetensors keys under a matrix's prefix)."""
        return {"codes": self.codes, "scale_codes": self.scale_codes, "scales": self.scales, "offset": self.offset}

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored parts as safetensors entries ``<prefix>.codes`` etc."""
        return {f"{prefix}.{k}": v.contiguous() for k, v in self.tensors().items()}

    @classmethod
    def from_tensors(cls, get: Callable[[str], torch.Tensor], prefix: str, shape: tuple[int, ...],
                     config: QConfig) -> QuantizedTensor:
        """Rebuild from :meth:`to_tensors` entries; ``get`` reads one by key (e.g. ``safe_open.get_tensor``)."""
        parts = {k: get(f"{prefix}.{k}") for k in ("codes", "scale_codes", "scales", "offset")}
        return cls(tuple(shape), config, **parts)

    def block_scales(self) -> torch.Tensor:
        """The float32 absmax each B0 block is dequantized with."""
        cfg = self.config
        if cfg.scale_bits is None:
            return self.scales.to(torch.float32)
        n0 = -(-self.numel // cfg.block0)
        codes = unpack(self.scale_codes, cfg.scale_bits, n0)
        return _scale_values(codes, self.scales, self.offset, cfg)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        cfg = self.config
        values = nf_levels(cfg.bits).to(self.codes.device)[unpack(self.codes, cfg.bits, self.numel)]
        scales = self.block_scales()
        values = torch.nn.functional.pad(values, (0, scales.numel() * cfg.block0 - self.numel))
        return (values.view(-1, cfg.block0) * scales[:, None]).reshape(-1)[: self.numel].view(self.shape).to(dtype)


def _blocks(flat: torch.Tensor, size: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks of ``size`` and viewed as [blocks, size]."""
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % size)).view(-1, size)


def _scale_values(codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor, cfg: QConfig) -> torch.Tensor:
    """Dequantized B0 absmaxes: code / (qmax / absmax_B1) + offset (unsigned fake-quant, as LQ-LoRA)."""
    qmax = 2 ** (cfg.scale_bits or 0) - 1
    amax = scales.to(torch.float32).repeat_interleave(cfg.block1 or 1)[: codes.numel()]
    step = torch.where(amax > 0, amax / qmax, torch.zeros_like(amax))
    return codes.to(torch.float32) * step + offset.to(torch.float32)


def _double_quantize(absmax: torch.Tensor, cfg: QConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale codes, per-B1 absmax in dtype b1, offset) of the B0 absmaxes."""
    qmax = 2 ** (cfg.scale_bits or 0) - 1
    offset = absmax.min().reshape(1)
    shifted = absmax - offset
    amax = _blocks(shifted, cfg.block1 or 1).amax(dim=1).to(SCALE_DTYPES[cfg.scale_dtype])
    amax_f = amax.to(torch.float32).repeat_interleave(cfg.block1 or 1)[: absmax.numel()]
    scaled = torch.where(amax_f > 0, shifted * (qmax / amax_f), torch.zeros_like(shifted))
    return torch.round(scaled).clamp(0, qmax).to(torch.int64), amax, offset


def nearest_level(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest NF level (ties to the lower level)."""
    levels = nf_levels(bits).to(x.device)
    return torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)


def quantize(weight: torch.Tensor, cfg: QConfig) -> QuantizedTensor:
    """Quantize ``weight`` (any shape, computed in float32) into packed NF-b storage."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    blocks = _blocks(flat, cfg.block0)
    absmax = blocks.abs().amax(dim=1)
    if cfg.scale_bits is None:
        stored = absmax.to(SCALE_DTYPES[cfg.scale_dtype])
        scale_codes, offset = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.float32)
        scales = stored.to(torch.float32)
    else:
        codes0, stored, offset = _double_quantize(absmax, cfg)
        scales = _scale_values(codes0, stored, offset, cfg)
        scale_codes = pack(codes0, cfg.scale_bits)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = nearest_level(blocks / safe[:, None], cfg.bits).reshape(-1)
    per = group(cfg.bits)[0]  # the byte group's padding holds the zero level, as bitsandbytes writes it
    codes = codes[: -(-flat.numel() // per) * per]
    return QuantizedTensor(tuple(weight.shape), cfg, pack(codes, cfg.bits), scale_codes.to(flat.device),
                           stored, offset.to(flat.device))
