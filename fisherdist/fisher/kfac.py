"""Kronecker factors of Linear layers (K-FAC, "expand" variant), each reduced to ONE owner rank.

For a Linear layer with inputs a_m and output gradients g_m at every token m (g of the per-sample loss),
F ~ A (x) G with A = (1/M) sum_m a_m a_m^T (M tokens; a gets a trailing 1 when the layer has a bias) and
G = (1/N) sum_m g_m g_m^T (N samples). Activations are whole even under FSDP / ZeRO-3, so each rank forms
a layer's local factors in its backward hook and streams them straight into a
:class:`~fisherdist.fisher.comm.BucketedReduceScatter` over an ``owned`` placement (``fisher.bucket_mb``
buckets, backward's layer order): every factor lands whole on the rank that will invert it, added into its
running sum piece by piece. Peak per rank: the owned factors + one bucket + the layer's local factors
being formed, on every backend (the ZeRO bound of the diagonal statistics; ``tests/test_fisher_memory.py``).
Whatever a backward did not reach goes out as zeros when it ends, so every rank issues the same collectives.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from fisherdist.distributed.collectives import DTYPES
from fisherdist.errors import FisherdistError
from fisherdist.fisher.api import DEFAULT_STATE
from fisherdist.fisher.backends import make_backend
from fisherdist.fisher.backends.zero_internals import at_backward_end
from fisherdist.fisher.comm import BucketedReduceScatter, bucket_numel
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.spec import FisherSpec
from fisherdist.fisher.state import FisherState
from fisherdist.fisher.targets import clean_fqn, tensor_hook


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
    """Same loop surface as ``FisherAccumulator`` (:class:`fisherdist.fisher.api.Accumulator`)."""

    def __init__(self, model: object, spec: FisherSpec, *, backend: str | None = None) -> None:
        self.spec = spec
        self.backend = make_backend(model, backend)
        self.layers = linear_modules(self.backend.unwrapped, spec.params)
        self.dtype = DTYPES[spec.dtype]
        self.sides = ("G",) if spec.kfac_factors == "output" else ("A", "G")
        shapes: dict[str, tuple[int, ...]] = {}
        for name, m in self.layers.items():
            d_in = m.in_features + (1 if m.bias is not None else 0)
            if "A" in self.sides:
                shapes[f"{name}.A"] = (d_in, d_in)
            shapes[f"{name}.G"] = (m.out_features, m.out_features)
        # A and G of one layer share an owner: that rank inverts both.
        self.placement = Placement.owned(shapes, self.backend.rank, self.backend.world, group_of=lambda f: f[:-2])
        self._device = next(self.backend.unwrapped.parameters()).device
        meta = {"estimator": "kfac", "granularity": "sample", "token_weighted": False, "dtype": spec.dtype,
                "decay": spec.decay, "kfac_factors": spec.kfac_factors, "kfac_tokens": spec.kfac_tokens,
                "convention": "A = sum a a^T / counts.tokens, G = sum g g^T / counts.samples",
                "shapes": {f: list(s) for f, s in shapes.items()}, **self.backend.describe()}
        self.state = FisherState(self.placement, ("sum",), meta, dtype=self.dtype, device=self._device,
                                 group=self.backend.group)
        order = [f"{n}.{side}" for n in reversed(self.layers) for side in self.sides]  # backward's order
        self._reducer = BucketedReduceScatter(self.placement, order, 1, bucket_numel(spec.bucket_mb, self.dtype), None,
                                              self.backend.group, into=lambda f: [self.state.buffers["sum"][f]])
        self._armed = False
        self._inputs: dict[str, torch.Tensor] = {}
        self._token_mask = torch.zeros(0)
        self._grad_scale = 1.0
        self._counts: dict[str, torch.Tensor] = {}
        self._step_counts: dict[str, torch.Tensor] = {}
        self._recording = False
        self._handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.layers.items()]

    def _forward_hook(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not (self._recording and torch.is_grad_enabled() and output.requires_grad):
                return
            if "A" in self.sides:
                a = inputs[0].detach()
                if getattr(module, "bias", None) is not None:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                self._inputs[name] = a
            tensor_hook(output, lambda g: self._backward(name, g))

        return hook

    def _backward(self, name: str, grad: torch.Tensor) -> None:
        """The layer's local factors, handed to the reducer one at a time (the bucket copies them)."""
        if not self._armed:
            self._armed = True
            at_backward_end(self._end_backward)
        with torch.no_grad():
            mask = self._token_mask.to(self.dtype).reshape(*grad.shape[:-1], 1)
            if "A" in self.sides:
                a = self._inputs.pop(name).to(self.dtype)
                a2 = (a * mask).reshape(-1, a.shape[-1])
                self._reducer.add(f"{name}.A", [a2.T @ a2])
                del a, a2
            g2 = (grad.to(self.dtype) * self._grad_scale * mask).reshape(-1, grad.shape[-1])
            self._reducer.add(f"{name}.G", [g2.T @ g2])

    def _end_backward(self) -> None:
        """Factors of layers this backward did not reach go out as zeros (same collectives on every rank)."""
        self._armed = False
        self._reducer.flush(torch.zeros((), dtype=self.dtype, device=self._device))

    @contextlib.contextmanager
    def record(self, labels: torch.Tensor | None = None, *, valid: torch.Tensor | None = None,
               loss_scale: float = 1.0, state: str = DEFAULT_STATE, count: bool = True) -> Iterator[None]:
        """The backpropagated loss must be ``loss_scale`` x the sum of per-sample mean NLLs. The tokens
        in the factors are the loss-carrying positions: the logits at t predict label t+1, so position t
        counts when ``labels[t + 1] != -100`` (the last position never does); with ``kfac_tokens: context``
        every position up to a sample's last such one counts (right-padded rows: prompt and response)."""
        if labels is None or state != DEFAULT_STATE:
            raise FisherdistError("K-FAC record() needs labels and keeps one (the default) state")
        if self.state.decay_due and self.spec.decay is not None:
            self.state.decay(self.spec.decay)
        self.state.decay_due = False
        sample_ok = torch.ones(labels.shape[0], device=labels.device) if valid is None else valid.to(torch.float32)
        carries = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        carries[:, :-1] = (labels[:, 1:] != -100).to(torch.float32)
        if self.spec.kfac_tokens == "context":
            carries = carries.flip(1).cummax(1).values.flip(1)
        self._token_mask = sample_ok[:, None] * carries
        self._grad_scale = self.backend.grad_scale / loss_scale
        self._counts = {"weight": torch.ones((), dtype=torch.float64)}
        if count:
            self._counts.update(samples=sample_ok.sum().double(), tokens=self._token_mask.sum().double())
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
            self._inputs.clear()
            for name, value in self._counts.items():
                self._step_counts[name] = self._step_counts.get(name, 0.0) + value
            self._counts = {}

    def cancel(self) -> None:
        """The current ``record()`` block is left without a backward: it counts nothing."""
        self._counts = {}

    def step(self, *, optimizer_step: bool = True) -> None:
        """Close the step's counts; the factors were reduced into the sums during each backward."""
        self.state.count(steps=1.0, **self._step_counts)
        self._step_counts = {}
        self.state.decay_due = optimizer_step

    def owned(self) -> list[str]:
        """Layers whose factors live on this rank."""
        return sorted({f[:-2] for f in self.placement.shapes if self.placement.owner(f) == self.placement.rank})

    def fisher(self, fqn: str, *, counts: dict[str, float] | None = None, state: str = DEFAULT_STATE) -> torch.Tensor:
        """This rank's part (all or nothing, flat) of factor ``fqn`` (``<layer>.A`` / ``<layer>.G``), normalised."""
        counts = counts or self.state.global_counts()
        return self.state.buffers["sum"][fqn] / (counts["tokens"] if fqn.endswith(".A") else counts["samples"])

    def factors(self, layer: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(A, G)`` of a layer this rank owns, normalised (global counts: one collective); A is None when
        only the output-side factor is kept."""
        counts = self.state.global_counts()
        owner = self.placement.owner(f"{layer}.G")
        if owner != self.placement.rank:
            raise FisherdistError(f"K-FAC factors of {layer} live on rank {owner}")
        a = self._square(f"{layer}.A", counts) if "A" in self.sides else None
        return a, self._square(f"{layer}.G", counts)

    def _square(self, fqn: str, counts: dict[str, float]) -> torch.Tensor:
        return self.fisher(fqn, counts=counts).view(self.placement.shapes[fqn])

    def eigenbasis(self, fqn: str, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-``m`` eigenvalues ``(m,)`` (descending) and eigenvectors ``(d, m)`` of factor ``fqn``,
        computed on its owner rank and broadcast: small and replicated, the whole factor never moves
        (collective: every rank calls it)."""
        d = self.placement.shapes[fqn][0]
        if not 0 < m <= d:
            raise FisherdistError(f"K-FAC eigenbasis of {fqn}: m={m} must be in 1..{d}")
        counts = self.state.global_counts()
        packed = torch.zeros(m + d * m, dtype=self.dtype, device=self._device)
        if self.placement.owner(fqn) == self.placement.rank:
            values, vectors = torch.linalg.eigh(self._square(fqn, counts))
            packed = torch.cat([values.flip(0)[:m], vectors.flip(1)[:, :m].reshape(-1)])
        packed = self._from_owner(fqn, packed)
        return packed[:m], packed[m:].view(d, m)

    def trace(self, fqn: str) -> float:
        """The trace of factor ``fqn`` (the sum of all its eigenvalues), from its owner rank (collective)."""
        counts = self.state.global_counts()
        value = torch.zeros(1, dtype=self.dtype, device=self._device)
        if self.placement.owner(fqn) == self.placement.rank:
            value = self._square(fqn, counts).diagonal().sum().reshape(1)
        return float(self._from_owner(fqn, value)[0])

    def _from_owner(self, fqn: str, packed: torch.Tensor) -> torch.Tensor:
        """``packed`` as the owner rank of ``fqn`` holds it, on every rank."""
        if self.placement.world > 1:
            group = self.backend.group
            owner = self.placement.owner(fqn)
            src = dist.get_global_rank(group, owner) if group is not None else owner
            dist.broadcast(packed, src=src, group=group)
        return packed

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
