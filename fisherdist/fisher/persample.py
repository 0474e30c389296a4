"""Exact per-example gradient statistics (``sample`` granularity) from module hooks, batched.

For each target parameter p the statistics ``sq = sum_i w_i g_i(p)**2`` (and ``first = sum_i w_i g_i(p)``)
are formed during backward from the layer input (captured in forward) and the output gradient, with
``g_i = grad_scale * d(loss)/d(output_i)`` contracted with the input of sample i. They are delivered through
``on_ready(fqn, [sq, first?])`` *inside* backward, before the framework reduces that parameter's gradient,
so FSDP2 / DDP reduction hooks can consume them; without a callback they accumulate in ``results``.

Two capture paths:

* hook path (Embedding, RMSNorm, and Linear with ``fused=False``): a forward hook keeps the input and
  registers a tensor hook on the output that receives its gradient;
* fused path (``nn.Linear``, default): the module's forward is swapped for :class:`_FusedLinear`, whose
  backward computes the per-sample gradients once and returns their sum as the weight gradient, so
  autograd's own weight-gradient matmul is not done twice. Frozen weights (PEFT ``base_layer``) get None.
  Its input is an autograd saved tensor, so activation checkpointing (reentrant or not) frees and
  recomputes it like any other activation. The hook path keeps its captured input alive under
  non-reentrant checkpointing (correct, but no memory saving for those modules).

Only activations and output gradients are used, never parameter values (RMSNorm needs its eps only;
the fused Linear uses the weight the module itself computes with), so FSDP1/FSDP2/ZeRO-3 sharding is
transparent. The model's module names are the caller's business: pass ``{clean_fqn: (module, attr)}``.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fisherdist.errors import FisherdistError
from fisherdist.fisher.persample_layers import Moments, embedding_stats, is_rmsnorm, linear_stats, rmsnorm_stats
from fisherdist.fisher.targets import clean_fqn, tensor_hook

Targets = dict[str, tuple[nn.Module, str]]
OnReady = Callable[[str, list[torch.Tensor]], None]

_ATTRS = {"linear": ("weight", "bias"), "embedding": ("weight",), "rmsnorm": ("weight",)}


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "rmsnorm" if is_rmsnorm(module) else None


def find_targets(model: nn.Module, fqns: list[str]) -> Targets:
    """``{fqn: (owning module, attribute)}`` for parameter names of the unwrapped model.

    Wrapper tokens (FSDP1, checkpoint wrappers, torch.compile; see ``targets.clean_fqn``) in module names
    are ignored, so a model wrapped in place still resolves. A parameter shared by several modules (tied weights) is an error:
    its gradient has contributions the owning module's hooks do not see.
    """
    modules: dict[str, nn.Module] = {}
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        clean = clean_fqn(name + ".")[:-1]  # trailing dot: a wrapper's inner module maps to the wrapper's name
        modules[clean] = mod  # the innermost module wins over its wrapper (it comes later)
        for attr, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{clean}.{attr}" if clean else attr)
    out: Targets = {}
    for fqn in fqns:
        mod_name, _, attr = fqn.rpartition(".")
        mod = modules.get(mod_name)
        p = mod._parameters.get(attr) if mod is not None else None
        if mod is None or p is None:
            raise FisherdistError(f"per-sample statistics: {fqn} is not a parameter owned directly by a module")
        names = sorted(set(owners[id(p)]))
        if len(names) > 1:
            raise FisherdistError(
                f"per-sample statistics: {fqn} is shared by several modules ({', '.join(names)}); tied weights are not supported"
            )
        out[fqn] = (mod, attr)
    return out


#: the collector of each Linear whose forward is swapped for the fused one (while attached)
_OWNERS: weakref.WeakKeyDictionary[nn.Module, PerSampleStats] = weakref.WeakKeyDictionary()


class _FusedLinear(torch.autograd.Function):
    """``F.linear`` whose backward forms the per-sample statistics and the weight gradient in one go."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                anchor: torch.Tensor | None, owner: PerSampleStats, module: nn.Module) -> torch.Tensor:
        ctx.owner, ctx.module = owner, module  # ctx: autograd's FunctionCtx, which carries what we set on it
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, gout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        owner: PerSampleStats = ctx.owner
        with torch.no_grad():
            need_w = ctx.needs_input_grad[1]
            grad_w = owner._linear_backward(ctx.module, x, gout, want_grad_sum=need_w)
            grad_x = gout.matmul(weight.to(gout.dtype)) if ctx.needs_input_grad[0] else None
            grad_b = gout.reshape(-1, gout.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_x, grad_w, grad_b, None, None, None


class PerSampleStats:
    """Per-example ``sq`` / ``first`` statistics of target parameters, collected while attached.

    ``targets``: ``{clean_fqn: (module, attr)}`` (see :func:`find_targets`). ``on_ready(fqn, stats)`` is
    called during backward with ``[sq]`` or ``[sq, first]`` (full parameter shape); without it the
    statistics are summed into :attr:`results`. ``dtype``: statistics dtype (None: float64 for float64
    models, else float32). ``fused``: use :class:`_FusedLinear` for ``nn.Linear``. ``max_elements``: budget
    for one chunk of per-sample gradients (samples are processed in chunks; results are unchanged).
    """

    def __init__(
        self,
        targets: Targets,
        *,
        want_first: bool = False,
        on_ready: OnReady | None = None,
        dtype: torch.dtype | None = None,
        fused: bool = True,
        max_elements: int = 1 << 22,
    ) -> None:
        self.want_first, self.on_ready, self.fused, self.max_elements = want_first, on_ready, fused, max_elements
        self.results: dict[str, list[torch.Tensor]] = {}
        self._by_module: dict[nn.Module, dict[str, str]] = {}
        seen: dict[int, str] = {}
        for fqn, (mod, attr) in targets.items():
            kind = _kind(mod)
            if kind is None or attr not in _ATTRS[kind]:
                raise FisherdistError(
                    f"per-sample statistics: parameter {fqn} belongs to unsupported module type {type(mod).__name__} "
                    f"(supported: Linear weight/bias, Embedding weight, RMSNorm weight)"
                )
            p = getattr(mod, attr)
            if id(p) in seen:
                raise FisherdistError(f"per-sample statistics: {fqn} and {seen[id(p)]} are the same (tied) parameter")
            seen[id(p)] = fqn
            self._by_module.setdefault(mod, {})[attr] = fqn
        self._dtype = dtype
        self._weights: torch.Tensor | None = None
        self._scale: torch.Tensor | float = 1.0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._swapped: list[nn.Module] = []
        self._pending: dict[nn.Module, int] = {}
        self._anchors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # -- lifecycle ----------------------------------------------------------------------------------
    def set_batch(self, weights: torch.Tensor, grad_scale: float | torch.Tensor = 1.0) -> None:
        """Per-sample weights (B,) of the next backward, and the factor undoing the caller's loss scaling."""
        self._weights, self._scale = weights, grad_scale

    def attach(self) -> None:
        """Install hooks (idempotent); statistics are collected for every backward until :meth:`detach`."""
        if self._handles or self._swapped:
            return
        self._pending.clear()
        for mod in self._by_module:
            # only a stock forward may be replaced: subclasses (bitsandbytes Linear4bit, ...) use the hook path,
            # and so does a second collector on a module another one (another accumulator) already swapped
            stock = type(mod).forward is nn.Linear.forward and "forward" not in vars(mod)
            if self.fused and isinstance(mod, nn.Linear) and stock:
                object.__setattr__(mod, "forward", types.MethodType(_fused_forward, mod))  # instance attribute
                _OWNERS[mod] = self
                self._swapped.append(mod)
            else:
                self._handles.append(mod.register_forward_hook(self._forward_hook))

    def detach(self) -> None:
        """Remove every hook and restore swapped forwards; the model is as if never hooked."""
        for h in self._handles:
            h.remove()
        for mod in self._swapped:
            del mod.forward
            _OWNERS.pop(mod, None)
        self._handles.clear()
        self._swapped.clear()
        self._anchors.clear()

    def reset(self) -> None:
        """Forget accumulated :attr:`results`."""
        self.results.clear()

    # -- hook path ----------------------------------------------------------------------------------
    def _forward_hook(self, mod: nn.Module, args: tuple[torch.Tensor, ...], output: object) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor) or not torch.is_grad_enabled():
            return None
        self._enter(mod)
        if not output.requires_grad:  # frozen module fed by frozen inputs: make its output gradient exist
            output = output + self._anchor(output)
        inp = args[0].detach()

        def on_grad(gout: torch.Tensor) -> None:
            with torch.no_grad():
                if isinstance(mod, nn.Linear):
                    self._linear_backward(mod, inp, gout, want_grad_sum=False)
                else:
                    self._emit(mod, self._other_stats(mod, inp, gout))

        tensor_hook(output, on_grad)
        return output

    def _enter(self, mod: nn.Module) -> None:
        """Refuse a second call of ``mod`` before its backward: per-sample squares need the summed call.

        Calls during backward are checkpoint recomputes: reentrant ones are the only capture, and a
        non-reentrant recompute's outputs are never backpropagated, so neither is counted.
        """
        if torch._C._current_graph_task_id() != -1:
            return
        if self._pending.get(mod):
            raise FisherdistError(
                f"per-sample statistics: module {type(mod).__name__} ({', '.join(self._by_module[mod].values())}) "
                f"was called twice before its backward; per-sample squares need one call per forward"
            )
        self._pending[mod] = 1

    def _anchor(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-d zero leaf that requires grad: added to (or fed into) a module whose output would not
        require grad (e.g. the first frozen ``base_layer`` or a frozen embedding), so autograd still
        computes that output's gradient. Its own gradient is never used."""
        key = (like.device, like.dtype)
        if key not in self._anchors:
            self._anchors[key] = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        return self._anchors[key]

    # -- maths dispatch -----------------------------------------------------------------------------
    def _w(self, like: torch.Tensor) -> torch.Tensor:
        if self._weights is None:
            raise FisherdistError("per-sample statistics: call set_batch(weights) before the backward pass")
        dt = self._dtype or (torch.float64 if like.dtype == torch.float64 else torch.float32)
        return self._weights.to(device=like.device, dtype=dt)

    def _linear_backward(self, mod: nn.Module, x: torch.Tensor, gout: torch.Tensor, *, want_grad_sum: bool) -> torch.Tensor | None:
        self._pending[mod] = 0
        attrs = self._by_module[mod]
        moments, grad_sum = linear_stats(
            x, gout, self._w(gout), weight_target="weight" in attrs, bias_target="bias" in attrs,
            want_first=self.want_first, want_grad_sum=want_grad_sum, max_elements=self.max_elements,
        )
        self._emit(mod, moments)
        return grad_sum

    def _other_stats(self, mod: nn.Module, inp: torch.Tensor, gout: torch.Tensor) -> dict[str, Moments]:
        self._pending[mod] = 0
        w = self._w(gout)
        if isinstance(mod, nn.Embedding):
            return {"weight": embedding_stats(mod, inp, gout, w, want_first=self.want_first)}
        return {"weight": rmsnorm_stats(mod, inp, gout, w, want_first=self.want_first)}

    def _emit(self, mod: nn.Module, moments: dict[str, Moments]) -> None:
        for attr, m in moments.items():
            fqn = self._by_module[mod][attr]
            stats = m.result(self._scale)
            if self.on_ready is not None:
                self.on_ready(fqn, stats)
            elif fqn in self.results:
                for acc, s in zip(self.results[fqn], stats):
                    acc += s
            else:
                self.results[fqn] = stats


def _fused_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Replacement ``nn.Linear.forward`` while fused collection is attached."""
    if not torch.is_grad_enabled():
        return F.linear(x, self.weight, self.bias)
    owner = _OWNERS[self]
    owner._enter(self)
    trainable = x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
    anchor = None if trainable else owner._anchor(x)
    out: torch.Tensor = _FusedLinear.apply(x, self.weight, self.bias, anchor, owner, self)  # type: ignore[no-untyped-call]
    return out
