"""GaLore and Natural GaLore AdamW as ``torch.optim.Optimizer``s, single process, FSDP2 and DDP.

Param groups take galore-torch's keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``), so code
written for ``galore_torch.GaLoreAdamW`` runs by changing the import; groups without ``rank`` get
galore-torch's AdamW update (eps 1e-6, bias correction folded into the step size, decoupled weight decay
applied after the step). Natural GaLore adds ``history`` (window s, 0 = GaLore) and ``damping`` (lambda).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from fisherdist.optim import adam, natural, owners, subspace
from fisherdist.optim.batching import Scratch, batches, refresh_chunks
from fisherdist.optim.layout import Layout, local
from fisherdist.optim.state import StateParts, init_state, state_bytes
from fisherdist.optim.validate import check_group, check_options, resolve_owner_mode

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW in a low-rank gradient subspace (Zhao et al. 2024), refreshed every ``update_proj_gap`` steps.

    Extra options: ``subspace`` ('exact' SVD, galore-torch's choice, or 'randomized' Halko SVD, GaLore 2's),
    ``oversample`` / ``power_iters`` / ``seed`` for the randomized sketch; ``owner_sharding`` (None: on for
    plain parameters in a multi-rank run, i.e. DDP); ``layerwise`` (step each parameter in its
    post-accumulate-grad hook); ``max_grad_norm`` (global clipping before the step, not with layerwise).
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 history: int = 0, damping: float = 1e-3, history_dtype: torch.dtype | None = None,
                 reset_history: bool = True, subspace: str = "exact", oversample: int = 8,
                 power_iters: int = 2, seed: int = 0, owner_sharding: bool | None = None,
                 layerwise: bool = False, grad_accumulation: int = 1, max_grad_norm: float | None = None) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias, "history": history, "damping": damping}
        self.options: dict[str, Any] = {"history_dtype": history_dtype, "reset_history": reset_history, "subspace": subspace,
                        "oversample": oversample, "power_iters": power_iters, "seed": seed}
        check_options(self.options, layerwise, grad_accumulation, max_grad_norm)
        self.max_grad_norm = max_grad_norm
        self.layerwise = layerwise
        self._scratch: dict[tuple[Any, ...], torch.Tensor] = {}
        self._batches: dict[tuple[Any, ...], Scratch] = {}
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_group(group)
        self._index = {id(p): i for i, p in enumerate(self._params())}
        self._owner, self._me, self._world = resolve_owner_mode(list(self._params()), owner_sharding, layerwise)
        if layerwise:
            self._hooks = [p.register_post_accumulate_grad_hook(self._layerwise_hook)  # type: ignore[no-untyped-call]
                           for p in self._params() if p.requires_grad]

    def _params(self) -> Iterable[torch.Tensor]:
        return (p for group in self.param_groups for p in group["params"])

    def _group_of(self, param: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(p is param for p in g["params"]))

    def _owns(self, param: torch.Tensor) -> bool:
        return self._owner is None or self._owner[self._index[id(param)]] == self._me

    def _layerwise_hook(self, param: torch.Tensor) -> None:
        """Step this parameter as soon as its gradient is final, then free the gradient."""
        with torch.no_grad():
            self._step_params([param], self._group_of(param))
        param.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every parameter with a gradient (a no-op in layer-wise mode: the hooks stepped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            return loss
        if self.max_grad_norm is not None:
            grads = [p for p in self._params() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        for group in self.param_groups:
            self._step_params([p for p in group["params"] if p.grad is not None and self._owns(p)], group)
        if self._owner is not None:
            owners.exchange(list(self._params()), self._owner, self._me, self._world)
        return loss

    def _step_params(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """AdamW on the full gradients, or on their (natural) low-rank projections when the group has a
        rank, for all of ``params`` (one group) together."""
        if not params:
            return
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                init_state(state, p, group, self.options["history_dtype"])
        torch._foreach_add_([state["step"] for state in states], 1.0)
        steps = [int(state["step"]) for state in states]  # the step being taken, from 1
        targets, grads = [local(p) for p in params], [local(p.grad) for p in params]  # type: ignore[arg-type]
        local_states = [{**state, "exp_avg": local(state["exp_avg"]), "exp_avg_sq": local(state["exp_avg_sq"])}
                        for state in states]
        if "rank" in group:
            self._low_rank_step(params, grads, group, local_states, steps)
        else:
            adam.apply(targets, grads, local_states, group, steps)
        adam.decay(targets, group)

    def _low_rank_step(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any],
                       states: list[dict[str, Any]], steps: list[int]) -> None:
        """Per batch (``batching.batches``: whole matrices whose low-rank gradients have as many elements, or
        row-sharded ones of one global shape): project (refreshing the projectors every ``update_proj_gap``
        steps), precondition, Adam into a zeroed buffer (which then holds -step size * m / (sqrt(v) + eps)),
        and add that, projected back, to each weight with one ``addmm_`` (``scale`` as alpha). Temporaries
        live in reused buffers."""
        gap, scale = int(group.get("update_proj_gap", 200)), float(group.get("scale", 1.0))
        proj_type = group.get("proj_type", "std")
        layouts = [Layout.of(p) for p in params]
        sides = [subspace.side_of(proj_type, layout.shape) for layout in layouts]
        for batch in batches(grads, layouts, sides, steps, int(group["rank"]), int(group["history"])):
            step, layout, side = steps[batch[0]], layouts[batch[0]], sides[batch[0]]
            if (step - 1) % gap == 0:
                for chunk in refresh_chunks(batch, layout):
                    self._refresh([params[i] for i in chunk], [grads[i] for i in chunk], group, layouts[chunk[0]],
                                  sides[chunk[0]], step - 1)
            projs = [local(states[i]["projector"]) for i in batch]
            window = local(states[batch[0]]["history"]).shape[0] if "history" in states[batch[0]] else 0
            scratch = self._project([grads[i] for i in batch], projs, [sides[i] for i in batch], layout, window)
            if window:
                self._natural([params[i] for i in batch], scratch, group, layout, step - 1, gap)
            scratch.update.zero_()
            adam.apply(scratch.updates, scratch.lows, [states[i] for i in batch], group, [step] * len(batch))
            updates = self._whole_updates(scratch, layout, side) if layout.sharded else scratch.updates
            for i, update, proj in zip(batch, updates, projs):
                subspace.add_back(local(params[i]), update, proj, sides[i], scale)

    def _project(self, grads: list[torch.Tensor], projs: list[torch.Tensor], sides: list[str], layout: Layout,
                 window: int) -> Scratch:
        """The batch's scratch, holding its low-rank gradients (``layout``: the batch's, whole matrices or
        row-sharded ones of one shape); sharded ``left`` ones keep this rank's column slice, their sums over
        shards taken by one all-reduce of the stacked r x n products."""
        shapes = [(g.shape[0], p.shape[0]) if side == "right" else (p.shape[1], g.shape[1])
                  for g, p, side in zip(grads, projs, sides)]
        if sides[0] == "left" and layout.sharded:
            full = self._buffer("low", (len(grads), *shapes[0]), grads[0])
            for g, p, out in zip(grads, projs, full):
                torch.mm(p.t(), g, out=out)
            layout.reduce(full)
            start, end = layout.columns(shapes[0][1])
            scratch = self._batch_scratch(window, [(shapes[0][0], end - start)] * len(grads), grads[0])
            torch._foreach_copy_(scratch.lows, list(full[:, :, start:end].unbind(0)))
            return scratch
        scratch = self._batch_scratch(window, shapes, grads[0])
        for g, p, side, row in zip(grads, projs, sides, scratch.lows):
            subspace.project(g, p, side, layout, row)
        return scratch

    def _whole_updates(self, scratch: Scratch, layout: Layout, side: str) -> list[torch.Tensor]:
        """The updates a row-sharded batch adds back: local rows as they are (``right``), or (``left``) the
        whole r x n updates rebuilt from every rank's column slice with one all-reduce for the batch."""
        if side == "right":
            return scratch.updates
        k, (r, width), n = len(scratch.updates), scratch.updates[0].shape, layout.shape[1]
        full = self._buffer("low", (k, r, n), scratch.update)
        full.zero_()
        start, end = layout.columns(n)
        full[:, :, start:end] = scratch.update.view(k, r, width)  # width may be 0: no -1 in the view
        return list(layout.reduce(full).unbind(0))

    def _batch_scratch(self, window: int, shapes: list[tuple[int, int]], like: torch.Tensor) -> Scratch:
        """The reused buffers of a batch of matrices whose low-rank gradients have ``shapes``."""
        key = (window, tuple(shapes), like.dtype, like.device)
        if key not in self._batches:
            self._batches[key] = Scratch(window, shapes, like)
        return self._batches[key]

    def _buffer(self, kind: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A scratch tensor reused across matrices and steps (not state: never checkpointed)."""
        key = (kind, tuple(shape), like.dtype, like.device)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._scratch[key]

    def _refresh(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any],
                 layout: Layout, side: str, step: int) -> None:
        """New projectors from these gradients (one whole matrix, or row-sharded ones of one shape); their
        windows restart empty (which makes their Gram caches stale)."""
        opts = self.options
        sketches = [(int(opts["oversample"]), int(opts["power_iters"]),
                     hash((opts["seed"], self._index[id(p)], step)) & (2 ** 62 - 1)) for p in params]
        projs = subspace.refresh(grads, layout, side, int(group["rank"]), str(opts["subspace"]), sketches)
        for param, proj in zip(params, projs):
            state = self.state[param]
            local(state["projector"]).copy_(proj)
            if opts["reset_history"] and "history" in state:
                local(state["history"]).zero_()

    def _natural(self, params: list[torch.Tensor], scratch: Scratch, group: dict[str, Any], layout: Layout,
                 step: int, gap: int) -> None:
        """Natural GaLore's window step for a batch, in place on its low-rank gradients in ``scratch``."""
        hists = [local(self.state[p]["history"]) for p in params]
        slot = (step % gap if self.options["reset_history"] else step) % hists[0].shape[0]
        natural.natural_steps_(scratch, hists, slot, float(group["damping"]), layout.reduce)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts floating state to the parameter dtype on load: put the history back in its own dtype."""
        super().load_state_dict(state_dict)
        for scratch in self._batches.values():
            scratch.forget()
        dtype = self.options["history_dtype"]
        for state in self.state.values():
            if "history" in state and dtype is not None:
                state["history"] = state["history"].to(dtype)

    def state_bytes(self) -> StateParts:
        """This rank's optimizer-state bytes by part: moments, projectors, history."""
        return state_bytes(self.state.values(), [b.gram for b in self._batches.values() if b.gram is not None])


class NaturalGaLoreAdamW(GaLoreAdamW):
    """GaLore whose low-rank gradient is preconditioned by the inverse of lambda*I + G G^T, G the last
    ``history`` low-rank gradients (Natural GaLore, arXiv 2410.16029, one-sided as in the paper), solved
    by Woodbury; the window is cleared when the subspace changes (``reset_history``), unlike the paper's code.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 history: int = 4, damping: float = 1e-3, **options: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, history=history, damping=damping,
                         **options)

