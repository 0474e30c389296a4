"""Fine-tuning of one arm (plain LoRA, LoRA + EWC, AlignGuard-LoRA) on the shared trainer.

The three arms share the loop, the data order and the step budget; they differ only in what is attached
to the model (AGL's alignment adapter) and in one :class:`TrainHook` adding the arm's penalty. A second
hook records the forgetting curve (refusal rate on the unsafe prompts every ``curve_every`` steps).
"""

from __future__ import annotations

from typing import Any

import torch

from fisherdist.eval.alignment import AlignmentData, unsafe_refusal
from fisherdist.methods.agl.adapters import module_factors
from fisherdist.methods.agl.penalty import AglWeights, combine, local_sums
from fisherdist.models.peft_utils import adapted_modules
from fisherdist.recipes.losses import collate_prompted, step_mean, token_mean_share
from fisherdist.recipes.trainer import StepBatch, TrainHook

Pairs = list[tuple[list[int], list[int]]]


class SftStepLoss(TrainHook):
    """The step's response-token-mean NLL: each rank's summed NLL times W over the global token count, so
    the backend's gradient average is the gradient of the global mean (a padding-only rank weighs 0).
    As a hook it logs that NLL (``nll``) in the step's row."""

    name = "sft"

    def __init__(self, wrapped: Any, pairs: Pairs, pad_id: int, max_length: int) -> None:
        self.w, self.pairs, self.pad_id, self.max_length = wrapped, pairs, pad_id, max_length
        self.device = next(wrapped.unwrapped.parameters()).device
        self.last = torch.zeros(())

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        real = [i for i in batch.mine if i >= 0]
        items = [self.pairs[i] for i in (real or [0])]
        b = collate_prompted([p for p, _ in items], [c for _, c in items], self.pad_id, self.max_length).to(self.device)
        loss = token_mean_share(self.w.module, b, bool(real), batch.world)
        self.last = loss.detach()
        return loss

    def after_step(self, batch: StepBatch, row: dict[str, Any]) -> None:
        row["nll"] = step_mean(self.last, batch.world)


class AglPenalty(TrainHook):
    """lambda_A L_A + lambda_T L_T + lambda_NC (alpha E_RO + (1 - alpha) E_GS) over every adapted module:
    each rank forms the partial sums of its share of output rows, one all-reduce sums the table."""

    name = "agl"

    def __init__(self, model: torch.nn.Module, weights: AglWeights, scale: float, rank: int, world: int) -> None:
        self.mods, self.w, self.scale, self.rank, self.world = adapted_modules(model), weights, scale, rank, world
        self.numel = torch.tensor([float(m.lora_b.shape[0] * m.lora_a.shape[1]) for m in self.mods], dtype=torch.float64)
        self.last: dict[str, torch.Tensor] = {}

    def extra_loss(self, batch: StepBatch) -> torch.Tensor:
        parts = torch.stack([local_sums(module_factors(m, self.scale, self.rank, self.world), self.w).double()
                             for m in self.mods])
        reduce = None
        if self.world > 1:
            import torch.distributed.nn.functional as dnn

            reduce = dnn.all_reduce
        out = combine(parts, self.numel.to(parts.device), self.w, reduce)
        self.last = {k: v.detach() for k, v in out.items()}
        return out["loss"]

    def after_step(self, batch: StepBatch, row: dict[str, Any]) -> None:
        row.update({f"agl_{k}": float(v) for k, v in self.last.items()})


class EwcPenalty(TrainHook):
    """LoRA + diagonal EWC: lambda * sum F * (s B A)^2, F the base weights' diagonal alignment Fisher
    (one module's update materialised at a time; replicated backends)."""

    name = "ewc"

    def __init__(self, model: torch.nn.Module, diag: dict[str, torch.Tensor], lam: float, scale: float) -> None:
        from fisherdist.methods.agl.adapters import hf_name

        self.mods, self.lam, self.scale = adapted_modules(model), lam, scale
        self.diag = [diag[hf_name(m.name)].to(m.lora_a.device) for m in self.mods]
        self.last = torch.zeros(())

    def extra_loss(self, batch: StepBatch) -> torch.Tensor:
        total = sum((f * (self.scale * m.lora_b @ m.lora_a).square()).sum() for m, f in zip(self.mods, self.diag))
        self.last = torch.as_tensor(total).detach()
        return self.lam * torch.as_tensor(total)

    def after_step(self, batch: StepBatch, row: dict[str, Any]) -> None:
        row["ewc_penalty"] = float(self.last)


class ForgettingCurve(TrainHook):
    """Refusal rate on the unsafe prompts before step 1 and after every ``every`` steps (and the last)."""

    name = "curve"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, data: AlignmentData, every: int, total: int) -> None:
        self.model, self.tokenizer, self.data, self.every, self.total = model, tokenizer, data, every, total
        self.points: list[tuple[int, float]] = []

    def before_loss(self, batch: StepBatch) -> None:
        if batch.step == 1:
            self.points.append((0, unsafe_refusal(self.model, self.tokenizer, self.data)))

    def after_step(self, batch: StepBatch, row: dict[str, Any]) -> None:
        if batch.step % self.every == 0 or batch.step == self.total:
            self.points.append((batch.step, unsafe_refusal(self.model, self.tokenizer, self.data)))
            row["unsafe_refusal"] = self.points[-1][1]
