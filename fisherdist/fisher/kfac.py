"""Kronecker factors of Linear layers (K-FAC, "expand" variant), each reduced to ONE owner rank.

For a Linear layer with inputs a_m and output gradients g_m at every token m (g of the per-sample loss),
F ~ A (x) G with A = (1/M) sum_m a_m a_m^T (M tokens; a gets a trailing 1 when the layer has a bias) and
G = (1/N) sum_m g_m g_m^T (N samples). Activations are whole even under FSDP / ZeRO-3, so each rank forms
local sums in module hooks; one reduce-scatter (``comm.reduce_scatter_to_owners`` over an ``owned``
placement) lands every factor whole on the rank that will invert it, instead of all-reducing to everyone.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator

import torch
from torch import nn

from fisherdist.errors import FisherdistError
from fisherdist.fisher.backends import make_backend
from fisherdist.fisher.comm import reduce_scatter_to_owners
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.state import FisherState
from fisherdist.fisher.targets import clean_fqn


def linear_modules(model: nn.Module, patterns: list[str]) -> dict[str, nn.Linear]:
    """Linear layers whose weight FQN matches a pattern (the module name is the key)."""
    found: dict[str, nn.Linear] = {}
    for pattern in patterns:
        hits = {clean_fqn(n): m for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and fnmatch.fnmatchcase(clean_fqn(n) + ".weight", pattern)}
        if not hits:
            raise FisherdistError(f"fisher.params: pattern {pattern!r} matches no Linear layer's weight (K-FAC needs Linear layers)")
        found.update(hits)
    return found


class KroneckerFactors:
    """Same loop surface as ``FisherAccumulator``: ``record(labels)``, ``step()``, ``state``."""

    def __init__(self, model: object, spec, *, backend: str | None = None) -> None:
        self.spec = spec
        self.backend = make_backend(model, backend)
        self.layers = linear_modules(self.backend.unwrapped, spec.params)
        self.dtype = torch.float64 if spec.dtype == "float64" else torch.float32
        shapes: dict[str, tuple[int, ...]] = {}
        for name, m in self.layers.items():
            d_in = m.in_features + (1 if m.bias is not None else 0)
            shapes[f"{name}.A"] = (d_in, d_in)
            shapes[f"{name}.G"] = (m.out_features, m.out_features)
        # A and G of one layer share an owner: that rank inverts both.
        self.placement = Placement.owned(shapes, self.backend.rank, self.backend.world, group_of=lambda f: f[:-2])
        device = next(self.backend.unwrapped.parameters()).device
        meta = {"estimator": "kfac", "granularity": "sample", "token_weighted": False, "dtype": spec.dtype,
                "convention": "A = sum a a^T / counts.tokens, G = sum g g^T / counts.samples",
                "shapes": {f: list(s) for f, s in shapes.items()}, **self.backend.describe()}
        self.state = FisherState(self.placement, ("sum",), meta, dtype=self.dtype, device=device, group=self.backend.group)
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._inputs: dict[str, torch.Tensor] = {}
        self._token_mask: torch.Tensor | None = None
        self._grad_scale = 1.0
        self._counts: dict[str, torch.Tensor] = {}
        self._recording = False
        self._handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.layers.items()]

    def _forward_hook(self, name: str):
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not (self._recording and torch.is_grad_enabled() and output.requires_grad):
                return
            a = inputs[0].detach()
            if module.bias is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            self._inputs[name] = a
            output.register_hook(lambda g, name=name: self._backward(name, g))

        return hook

    def _backward(self, name: str, grad: torch.Tensor) -> None:
        with torch.no_grad():
            a = self._inputs.pop(name).to(self.dtype)
            g = grad.to(self.dtype) * self._grad_scale
            mask = self._token_mask.to(self.dtype).reshape(*a.shape[:-1], 1)
            a2 = (a * mask).reshape(-1, a.shape[-1])
            g2 = (g * mask).reshape(-1, g.shape[-1])
            self._pending[f"{name}.A"] = [a2.T @ a2]
            self._pending[f"{name}.G"] = [g2.T @ g2]

    @contextlib.contextmanager
    def record(self, labels: torch.Tensor, *, valid: torch.Tensor | None = None, loss_scale: float = 1.0) -> Iterator[None]:
        """The backpropagated loss must be ``loss_scale`` x the sum of per-sample mean NLLs; the tokens
        counted in A are those carrying a label (padding and masked prompts are left out)."""
        sample_ok = torch.ones(labels.shape[0], device=labels.device) if valid is None else valid.float()
        tokens = sample_ok[:, None] * (labels != -100).float()
        self._token_mask = tokens
        self._grad_scale = self.backend.grad_scale / loss_scale
        self._counts = {"samples": sample_ok.sum().double(), "tokens": tokens.sum().double()}  # added at step()
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
            self._inputs.clear()

    def step(self) -> None:
        local = {}
        for fqn, shape in self.placement.shapes.items():
            local[fqn] = self._pending.pop(fqn, None) or [torch.zeros(shape, dtype=self.dtype)]
        for fqn, frags in reduce_scatter_to_owners(local, self.placement, self.backend.group).items():
            self.state.add("sum", fqn, frags[0])
        self.state.count(weight=1.0, steps=1.0, **self._counts)
        self._counts = {}

    def owned(self) -> list[str]:
        """Layers whose factors live on this rank."""
        return sorted({f[:-2] for f in self.placement.shapes if self.placement.owner(f) == self.placement.rank})

    def fisher(self, fqn: str, *, counts: dict[str, float] | None = None) -> torch.Tensor:
        """This rank's part (all or nothing) of factor ``fqn`` (``<layer>.A`` / ``<layer>.G``), normalised."""
        counts = counts or self.state.global_counts()
        return self.state.buffers["sum"][fqn] / (counts["tokens"] if fqn.endswith(".A") else counts["samples"])

    def factors(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, G)`` of a layer this rank owns, normalised (global counts: one collective)."""
        counts = self.state.global_counts()
        if self.placement.owner(f"{layer}.A") != self.placement.rank:
            raise FisherdistError(f"K-FAC factors of {layer} live on rank {self.placement.owner(f'{layer}.A')}")
        buf = self.state.buffers["sum"]
        a = buf[f"{layer}.A"].view(self.placement.shapes[f"{layer}.A"]) / counts["tokens"]
        g = buf[f"{layer}.G"].view(self.placement.shapes[f"{layer}.G"]) / counts["samples"]
        return a, g

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
