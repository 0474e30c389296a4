"""Fisher accumulation on a loop we do not own (``transformers.Trainer``, a plain ``accelerate`` loop).

The loop calls a Hugging Face causal LM with ``labels=`` and backpropagates a loss averaged its own way
(``num_items_in_batch`` across gradient accumulation, ``average_tokens_across_devices``, DeepSpeed's
gradient-accumulation scaling, a loss scaler). We cannot wrap that loss, so:

* a forward pre-hook on the model takes the labels and opens an accumulator ``record()`` block (forward
  and backward must both run inside it: the per-sample hooks read activations);
* a hook on the logits' gradient measures, per sample, the factor ``c_i`` between what is backpropagated
  and the gradient of that sample's mean token NLL: the gradient of a token-summed cross entropy at the
  logits is ``p - onehot(label)``, so ``c_i`` is the least-squares ratio over the sample's labelled
  positions times its label-token count. It runs before the gradient reaches any parameter, and
  ``FisherAccumulator.rescale`` divides each sample's squared gradient by ``c_i**2``;
* the loop closes the block after backward (``end_micro_batch``).

The logits hook must sit on the tensor the model's own ``loss`` was computed from. DeepSpeed ZeRO-3 (and
any framework that does the same) replaces every module's outputs in a forward hook of its own with
new autograd nodes (``PreBackwardFunctionForModule``); the loop backpropagates the model's ``loss``,
computed inside ``forward`` from the original logits, so a hook on the replaced ``logits`` never fires.
Our forward hook is therefore prepended (it runs before hooks registered earlier), and a micro-batch
whose logits gradient never arrived is refused at ``end_micro_batch`` instead of counted unscaled.

The ratio is exact whenever each sample's loss is a multiple of its token-summed NLL (every averaging
above); a loss that is not (label smoothing, a custom ``compute_loss``) gives a mismatch, detected as a
residual and refused.
"""

from __future__ import annotations

import contextlib
import gc
from functools import partial
from typing import Any

import torch
from torch import nn

from fisherdist.errors import FisherdistError
from fisherdist.fisher.accumulator import FisherAccumulator
from fisherdist.fisher.backends import detect_backend
from fisherdist.fisher.spec import FisherSpec
from fisherdist.fisher.targets import tensor_hook

#: framework wrappers that hold the user's model as ``.module`` (the Trainer hands callbacks the bare model)
WRAPPERS = ("DeepSpeedEngine", "DistributedDataParallel")
#: relative residual of the logits-gradient fit above which the loss is not a scaled token NLL
MAX_RESIDUAL = 1e-3


def check_spec(spec: FisherSpec) -> None:
    """Only the data-label, squared, per-sample statistics can be rescaled from a loss we did not write."""
    if spec.estimator != "empirical" or spec.granularity != "sample":
        raise FisherdistError(
            f"fisher: a Trainer / accelerate loop supports estimator empirical at granularity sample (got "
            f"estimator {spec.estimator!r}, granularity {spec.granularity!r}): the loop's own loss and labels are used"
        )


def framework_of(model: nn.Module) -> object:
    """``model`` itself when sharded in place (FSDP2) or alone, else the DeepSpeed engine or DDP module whose
    ``.module`` it is (found among live objects once, at attach time)."""
    if detect_backend(model) != "none":
        return model
    for obj in gc.get_objects():
        if type(obj).__name__ in WRAPPERS and getattr(obj, "module", None) is model:
            return obj
    return model


def loss_factors(logits: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, residual)``: per sample, the backpropagated gradient at the logits over that of the sample's
    mean token NLL, and the fit's relative residual (0 for any scaled NLL). No host sync."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    target = labels[:, 1:]
    factors, residuals = [], []
    for i in range(logits.shape[0]):  # one sample at a time: one vocabulary-sized buffer, like the loss's
        keep = (target[i] != -100).unsqueeze(-1).to(dtype)
        e = logits[i, :-1].to(dtype).softmax(-1)
        e.scatter_add_(-1, target[i].clamp_min(0).unsqueeze(-1), -torch.ones_like(e[:, :1]))
        e.mul_(keep)
        g = grad[i, :-1].to(dtype) * keep
        ee = (e * e).sum().clamp_min(torch.finfo(dtype).tiny)
        k = (g * e).sum() / ee
        factors.append(k * keep.sum())
        residuals.append((g - k * e).norm() / g.norm().clamp_min(torch.finfo(dtype).tiny))
    return torch.stack(factors), torch.stack(residuals)


class FisherTracker:
    """Accumulates ``spec`` over every training forward + backward of ``model`` (see the module notes).

    ``framework``: the object the loop trains (DeepSpeed engine, DDP, FSDP2 module); found when None.
    Call :meth:`end_micro_batch` after each backward and :meth:`close` at the end.
    """

    def __init__(self, model: nn.Module, spec: FisherSpec, framework: object | None = None) -> None:
        check_spec(spec)
        self.model = model
        self.acc = FisherAccumulator(framework if framework is not None else framework_of(model), spec)
        self._block: contextlib.AbstractContextManager[None] | None = None
        self._labels: torch.Tensor | None = None
        self._residual = torch.zeros((), dtype=torch.float64)
        self._measured = False
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, prepend=True)]  # before ZeRO-3's: see notes

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation, generation
        labels = kwargs.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise FisherdistError("fisher: the training loop called the model without labels=; the Fisher needs each "
                                  "sample's token NLL (label smoothing and a compute_loss that pops labels are not supported)")
        if self._block is not None:
            raise FisherdistError("fisher: the model ran two training forwards before a backward; call "
                                  "end_micro_batch() after each backward (one forward per micro-batch)")
        self._labels = labels
        self._block = self.acc.record(labels)
        self._block.__enter__()

    def _after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        labels, self._labels = self._labels, None
        logits = getattr(output, "logits", None)
        if labels is None or not isinstance(logits, torch.Tensor) or not logits.requires_grad:
            return
        tensor_hook(logits, partial(self._measure, logits.detach(), labels))

    def _measure(self, logits: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor) -> None:
        factors, residual = loss_factors(logits, labels, grad)
        self._residual = torch.maximum(self._residual.to(residual.device), residual.max().to(torch.float64))
        self.acc.rescale(factors)
        self._measured = True

    def end_micro_batch(self, optimizer_step: bool = True) -> None:
        """After a backward: close the block; ``optimizer_step=False`` inside gradient accumulation."""
        if self._block is None:
            return
        measured = self._close_block()
        if not measured:
            raise FisherdistError("fisher: the backward of this micro-batch never reached the model's output logits "
                                  "(no backward since the forward, or a forward hook registered after the tracker "
                                  "replaced the outputs); its per-sample scale is unknown, so the Fisher is refused")
        self.acc.step(optimizer_step=optimizer_step)

    def _close_block(self) -> bool:
        """Exit the open ``record()`` block (counting nothing if no logits gradient came); whether one came."""
        assert self._block is not None
        block, self._block = self._block, None
        measured, self._measured = self._measured, False
        if not measured:
            self.acc.cancel()
        block.__exit__(None, None, None)
        return measured

    def check(self) -> None:
        """Refuse a loss that is not a multiple of each sample's token NLL (one host sync; call rarely)."""
        worst = float(self._residual)
        if worst > MAX_RESIDUAL:
            raise FisherdistError(f"fisher: the training loss is not a scaled token NLL of the labels (relative "
                                  f"residual {worst:.2e} at the logits); the Fisher would not follow the mean convention")

    def close(self) -> None:
        if self._block is not None and not self._measured:  # a forward without backward: dropped
            self._close_block()
        self.end_micro_batch()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.acc.close()
