"""NF-b quantization: codes and values against a direct float64 implementation, packed bytes against the
storage formula (in memory and on disk), and bitsandbytes NF4 interoperability."""

from __future__ import annotations

import math
from pathlib import Path

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import norm

from fisherdist.models.packbits import pack, unpack
from fisherdist.models.quant import QConfig, QuantizedTensor, quantize, storage_nbytes
from fisherdist.models.quant_bnb import from_bnb, to_bnb

CONFIGS = ["nf4-8bit-fp32-64x256", "nf3-8bit-bf16-32x64", "nf2-3bit-fp16-16x16", "nf8-4bit-bf16-64x16",
           "nf4-2bit-fp32-16x256", "nf3-fp32-64", "nf2-bf16-16", "nf8-fp16-32"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def oracle_levels(bits: int) -> np.ndarray:
    offset = 0.9677083
    half = 2 ** (bits - 1)
    q = np.concatenate([np.linspace(1 - offset, 0.5, half)[:-1], np.linspace(0.5, offset, half + 1)])
    return norm.ppf(q) / norm.ppf(offset)


def oracle(w: torch.Tensor, cfg: QConfig) -> tuple[np.ndarray, np.ndarray]:
    """(codes, dequantized values) in float64, block by block."""
    x = w.reshape(-1).double().numpy()
    blocks = [x[i:i + cfg.block0] for i in range(0, x.size, cfg.block0)]
    absmax = np.array([np.abs(b).max() for b in blocks])
    cast = lambda v: torch.tensor(v, dtype=torch.float64).to(DTYPES[cfg.scale_dtype]).double().numpy()  # noqa: E731
    if cfg.scale_bits is None:
        scales = cast(absmax)
    else:
        qmax, lo = 2 ** cfg.scale_bits - 1, absmax.min()
        scales = np.empty_like(absmax)
        for j in range(0, absmax.size, cfg.block1):
            group = absmax[j:j + cfg.block1] - lo
            amax = cast(group.max())
            code = np.zeros_like(group) if amax == 0 else np.clip(np.round(group * qmax / amax), 0, qmax)
            scales[j:j + cfg.block1] = code * amax / qmax + lo
    levels = oracle_levels(cfg.bits)
    codes = []
    for b, s in zip(blocks, scales):
        codes.append(np.abs((b / (s if s > 0 else 1.0))[:, None] - levels[None]).argmin(1))
    codes_all = np.concatenate(codes)
    values = np.concatenate([levels[c] * s for c, s in zip(codes, scales)])
    return codes_all, values.reshape(w.shape)


def weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g) * 3
    w.view(-1)[:40] = 0.0  # an all-zero first block (offset 0 for the scale codes)
    return w


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("shape", [(37, 53), (1000,), (3, 5, 67)])
def test_matches_float64_oracle(name: str, shape: tuple[int, ...]) -> None:
    cfg = QConfig.parse(name)
    w = weights(shape, seed=len(name) + shape[0])
    qt = quantize(w, cfg)
    codes, values = oracle(w, cfg)
    assert np.array_equal(unpack(qt.codes, cfg.bits, w.numel()).numpy(), codes)
    np.testing.assert_allclose(qt.dequantize().double().numpy(), values, rtol=2e-6, atol=1e-7)
    assert qt.dequantize().shape == w.shape


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_roundtrip_and_dense(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (1237,))
    data = pack(codes, bits)
    per = math.lcm(8, bits) // bits  # codes that fill whole bytes
    assert data.dtype == torch.uint8 and data.numel() == math.ceil(1237 / per) * per * bits // 8
    assert torch.equal(unpack(data, bits, 1237), codes)
    bitstring = "".join(format(int(c), f"0{bits}b") for c in codes)  # the MSB-first bit stream, by hand
    bitstring += "0" * (data.numel() * 8 - len(bitstring))
    assert bytes(data.tolist()) == int(bitstring, 2).to_bytes(data.numel(), "big")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("numel", [1, 15, 4096, 70001])
def test_packed_bytes_equal_formula(name: str, numel: int, tmp_path: Path) -> None:
    cfg = QConfig.parse(name)
    qt = quantize(torch.randn(numel), cfg)
    b1 = {"bf16": 2, "fp16": 2, "fp32": 4}[cfg.scale_dtype]
    n0 = math.ceil(numel / cfg.block0)
    group_bytes = lambda n, b: math.ceil(n * b / math.lcm(8, b)) * math.lcm(8, b) // 8  # noqa: E731
    if cfg.scale_bits is None:
        expected = group_bytes(numel, cfg.bits) + n0 * b1
    else:
        expected = group_bytes(numel, cfg.bits) + group_bytes(n0, cfg.scale_bits) + math.ceil(n0 / cfg.block1) * b1 + 4
    assert qt.nbytes == storage_nbytes(numel, cfg) == expected
    path = tmp_path / "q.safetensors"
    save_file(qt.to_tensors("w"), str(path))
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size - 8 - header == expected  # bytes on disk: the data section is the packed tensor
    back = QuantizedTensor.from_tensors(load_file(str(path)).__getitem__, "w", (numel,), cfg)
    assert torch.equal(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize("name", ["nf4-8bit-fp32-64x256", "nf3-8bit-fp32-64x256", "nf2-3bit-bf16-16x16", "nf4-fp32-64"])
def test_formula_matches_paper_bits_without_padding(name: str) -> None:
    cfg = QConfig.parse(name)
    numel = 64 * 256 * 8 * 3
    b, B0 = cfg.bits, cfg.block0
    b1 = {"bf16": 16, "fp16": 16, "fp32": 32}[cfg.scale_dtype]
    paper = b + b1 / B0 if cfg.scale_bits is None else b + cfg.scale_bits / B0 + b1 / (B0 * cfg.block1)
    offset_bits = 0 if cfg.scale_bits is None else 32
    assert cfg.bits_per_param() == paper
    assert storage_nbytes(numel, cfg) * 8 - offset_bits == numel * paper
    assert QConfig.parse(cfg.name) == cfg


def test_nf4_alias_is_qlora_4127_bits() -> None:
    assert QConfig.parse("nf4").bits_per_param() == pytest.approx(4.127, abs=1e-3)
    assert QConfig.parse("nf3").bits_per_param() == pytest.approx(3.127, abs=1e-3)


@pytest.mark.parametrize("shape,block", [((33, 70), 64), ((128, 96), 128), ((1001,), 64)])
def test_bitsandbytes_nf4_interop(shape: tuple[int, ...], block: int) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(block))
    packed, state = bnbf.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=False)
    qt = quantize(w, QConfig(4, block, None, "fp32", None))
    assert torch.equal(qt.codes, packed.view(-1)) and torch.equal(qt.scales, state.absmax)
    theirs = bnbf.dequantize_4bit(packed, state)
    torch.testing.assert_close(from_bnb(packed, state).dequantize(), theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bnbf.dequantize_4bit(*to_bnb(qt)), qt.dequantize(), rtol=1e-6, atol=1e-6)


def test_bitsandbytes_double_quant_is_refused() -> None:
    packed, state = bnbf.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="nf4", compress_statistics=True)
    with pytest.raises(ValueError, match="nested"):
        from_bnb(packed, state)
    with pytest.raises(ValueError, match="no bitsandbytes equivalent"):
        to_bnb(quantize(torch.randn(64), QConfig.parse("nf4")))
