"""Fine-tuning of one arm (plain LoRA, LoRA + EWC, AlignGuard-LoRA) on the shared trainer.

The three arms share the loop, the data order and the step budget; they differ only in what is attached
to the model (AGL's alignment adapter) and in one :class:`TrainHook` adding the arm's penalty. A second
hook records the forgetting curve (refusal rate on the unsafe prompts every ``curve_every`` steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fisherdist.eval.alignment import AlignmentData, unsafe_refusal
from fisherdist.methods.agl.adapters import hf_name, module_factors
from fisherdist.methods.agl.penalty import AglWeights, combine, local_sums
from fisherdist.methods.agl.rows import Fetch, RowBlock, RowPenalty, row_block
from fisherdist.models.peft_utils import AdaptedModule
from fisherdist.recipes.trainer import StepBatch, TrainHook


class AglPenalty(RowPenalty):
    """lambda_A L_A + lambda_T L_T + lambda_NC (alpha E_RO + (1 - alpha) E_GS) over every adapted module,
    from each rank's row partial sums (:mod:`~fisherdist.methods.agl.rows`: any backend)."""

    name = "agl"

    def __init__(self, wrapped: Any, weights: AglWeights, scale: float) -> None:
        super().__init__(wrapped)
        self.w_agl, self.scale = weights, scale
        self.numel = torch.tensor([float(m.module.agl.u.shape[0] * m.module.agl.v.shape[0]) for m in self.mods],
                                  dtype=torch.float64)

    def params(self, mod: AdaptedModule) -> list[torch.Tensor]:
        return [mod.lora_a, mod.lora_b, mod.module.agl.c, mod.module.agl.a]

    def partials(self, fetch: Fetch) -> torch.Tensor:
        return torch.stack([local_sums(module_factors(m, fetch, self.scale, self.rank, self.world), self.w_agl).double()
                            for m in self.mods])

    def finish(self, total: torch.Tensor) -> dict[str, torch.Tensor]:
        return combine(total, self.numel.to(total.device), self.w_agl)

    def after_step(self, batch: StepBatch, row: dict[str, Any]) -> None:
        row.update({f"agl_{k}": float(v) for k, v in self.last.items()})


DiagRows = Callable[[str, int, int], torch.Tensor]
"""(HF module name, lo, hi) -> rows [lo, hi) of that module's diagonal Fisher."""


class EwcPenalty(RowPenalty):
    """LoRA + diagonal EWC: lambda * sum F * (s B A)^2, F the base weights' diagonal alignment Fisher; a rank
    reads and forms only its rows of F and of each update (:mod:`~fisherdist.methods.agl.rows`)."""

    name = "ewc"

    def __init__(self, wrapped: Any, diag_rows: DiagRows, lam: float, scale: float) -> None:
        super().__init__(wrapped)
        self.diag_rows, self.lam, self.scale = diag_rows, lam, scale
        self.diag: dict[tuple[str, int, int], torch.Tensor] = {}

    def params(self, mod: AdaptedModule) -> list[torch.Tensor]:
        return [mod.lora_a, mod.lora_b]

    def _rows(self, mod: AdaptedModule, blk: RowBlock) -> torch.Tensor:
        key = (hf_name(mod.name), blk.lo, blk.hi)
        if key not in self.diag:
            self.diag[key] = self.diag_rows(*key).to(blk.b.device)
        return self.diag[key]

    def partials(self, fetch: Fetch) -> torch.Tensor:
        parts = []
        for m in self.mods:
            blk = row_block(m.lora_b, fetch, self.rank, self.world)
            parts.append((self._rows(m, blk) * (self.scale * blk.b @ fetch(m.lora_a)).square()).sum())
        return torch.stack(parts).reshape(-1, 1)

    def finish(self, total: torch.Tensor) -> dict[str, torch.Tensor]:
        penalty = total.sum()
        return {"loss": self.lam * penalty, "penalty": penalty}

    def after_step(self, batch: StepBatch, row: dict[str, Any]) -> None:
        row["ewc_penalty"] = float(self.last["penalty"])


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
