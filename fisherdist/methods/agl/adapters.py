"""AlignGuard-LoRA's second adapter: dW_A = s * U C A_a beside PEFT's task adapter dW_T = s * B A_t.

:class:`AlignAdapter` sits on every PEFT LoRA layer as submodule ``agl`` (so its parameters have FQNs under
the layer and every backend sees them like LoRA factors) and adds ``s * ((x A_a^T) C^T) U^T`` to the
layer's output through a forward hook; both sides' top eigenpairs and residual levels are buffers (small,
replicated: (d_out + d_in) x m per module). C starts at zero, so the model starts exactly at the base model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from fisherdist.methods.agl.penalty import ModuleFactors
from fisherdist.methods.agl.rows import Fetch, row_block
from fisherdist.models.lora_base import ExtraDelta
from fisherdist.models.peft_utils import AdaptedModule, adapted_modules


@dataclass(frozen=True)
class ModuleBasis:
    """One module's alignment basis: top-m eigenvectors (d_out, m) and eigenvalues of its output-side
    Fisher factor G and the mean of G's other eigenvalues (a scalar tensor, 0 when m = d_out), the same
    three for the input-side factor A, all already normalised (see ``fisher.py``)."""

    vectors: torch.Tensor
    values: torch.Tensor
    residual: torch.Tensor
    in_vectors: torch.Tensor
    in_values: torch.Tensor
    in_residual: torch.Tensor


class AlignAdapter(nn.Module):
    """The alignment-subspace adapter of one linear layer."""

    def __init__(self, basis: ModuleBasis, d_in: int, rank: int, scale: float, init: torch.Tensor) -> None:
        super().__init__()
        m = basis.vectors.shape[1]
        self.scale = scale
        self.c = nn.Parameter(torch.zeros(m, rank, dtype=init.dtype))
        self.a = nn.Parameter(init.clone())
        self.register_buffer("u", basis.vectors.to(init.dtype).clone())
        self.register_buffer("lam", basis.values.to(init.dtype).clone())
        self.register_buffer("sigma", basis.residual.to(init.dtype).clone())
        self.register_buffer("v", basis.in_vectors.to(init.dtype).clone())
        self.register_buffer("mu", basis.in_values.to(init.dtype).clone())
        self.register_buffer("rho", basis.in_residual.to(init.dtype).clone())
        assert self.a.shape == (rank, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """dW_A x (called as a module, so ZeRO-3 gathers C and A_a for it)."""
        return self.scale * ((x @ self.a.T) @ self.c.T) @ self.u.T

    def dense(self, c: torch.Tensor | None = None, a: torch.Tensor | None = None) -> torch.Tensor:
        """dW_A (d_out, d_in) of one module, from its own factors or from gathered copies ``c``, ``a``."""
        c, a = (self.c if c is None else c), (self.a if a is None else a)
        return self.scale * self.u.to(device=c.device, dtype=c.dtype) @ (c @ a)


def _init_a(name: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A_a's seeded initial value, PEFT's kaiming-uniform bound, the same on every rank."""
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}.agl.a".encode()).digest()[:8], "little")
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=torch.Generator().manual_seed(digest)) * 2 - 1) * bound


def _hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    agl: AlignAdapter = module.agl
    return output + agl(inputs[0].to(agl.a.dtype)).to(output.dtype)


def attach(model: nn.Module, bases: dict[str, ModuleBasis], rank: int, scale: float, seed: int) -> list[str]:
    """Give every PEFT LoRA layer its :class:`AlignAdapter` (``bases`` keyed by the HF module name, e.g.
    ``model.layers.0.self_attn.q_proj``); returns the layers adapted, in module order."""
    names = []
    for mod in adapted_modules(model):
        key = hf_name(mod.name)
        if key not in bases:
            raise KeyError(f"no alignment basis for {key}")
        d_in = mod.lora_a.shape[1]
        dtype = mod.lora_a.dtype
        mod.module.agl = AlignAdapter(bases[key], d_in, rank, scale, _init_a(key, (rank, d_in), seed).to(dtype))
        mod.module.register_forward_hook(_hook)
        names.append(key)
    return names


def merged_delta() -> ExtraDelta:
    """dW_A in the streamed merged export (``models.lora_base.export_base``): C and A_a are gathered whole
    (m x k and k x d_in per module), U is every rank's replicated buffer, and the writing rank forms one
    module's dW_A at a time, so the merged W + dW_A + dW_T never needs the model whole on one rank."""

    def delta(mod: AdaptedModule, gathered: dict[str, torch.Tensor]) -> torch.Tensor:
        agl: AlignAdapter = mod.module.agl
        c, a = gathered[f"{mod.name}.agl.c"], gathered[f"{mod.name}.agl.a"]
        wide = torch.promote_types(c.dtype, torch.float32)  # (bf16 factors: the product in float32)
        return agl.dense(c.to(wide), a.to(wide))

    return ExtraDelta(owns=lambda fqn: ".agl." in fqn, delta=delta)


def hf_name(peft_name: str) -> str:
    """``base_model.model.model.layers.0...`` -> ``model.layers.0...`` (the name in the HF checkpoint)."""
    return peft_name.removeprefix("base_model.model.")


def module_factors(mod: AdaptedModule, fetch: Fetch, scale: float, rank: int, world: int) -> ModuleFactors:
    """The tensors :func:`~fisherdist.methods.agl.penalty.local_sums` needs for this rank's block of output
    rows (:func:`~fisherdist.methods.agl.rows.row_block`); ``fetch`` gives the small factors whole (and B,
    r columns, for P = U^T B). L_A and the P terms are formed whole on every rank, so each adds 1/world."""
    agl: AlignAdapter = mod.module.agl
    blk = row_block(mod.lora_b, fetch, rank, world)
    return ModuleFactors(u=agl.u[blk.lo:blk.hi], lam=agl.lam, sigma=agl.sigma, v=agl.v, mu=agl.mu, rho=agl.rho,
                         c=fetch(agl.c), a_align=fetch(agl.a), b=blk.b, a_task=fetch(mod.lora_a), u_all=agl.u,
                         b_all=fetch(mod.lora_b), scale=scale, replicated_share=1.0 / world)
