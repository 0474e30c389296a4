"""A second data stream beside the trainer's: texts cycled with a global cursor, each step taking the next
global batch of them (e.g. a retain loss for a gradient projection or a gradient-difference term).

The cursor advances by the global batch, so the batches do not depend on the world size; a rank's empty
slots repeat a text with weight 0. :meth:`CycledTexts.loss` is ``W * sum(per-text NLL) / G``, so the
ranks' gradient average is the gradient of the global batch's mean per-text NLL.
"""

from __future__ import annotations

from typing import Any

import torch

from fisherdist.distributed.collectives import rank_world
from fisherdist.errors import ConfigError
from fisherdist.fisher.loss import per_sample_nll


class CycledTexts:
    """Token lists taken ``per_rank`` per rank per call, in order, wrapping around; checkpointable."""

    def __init__(self, texts: list[list[int]], per_rank: int, max_length: int, pad_id: int) -> None:
        if not texts:
            raise ConfigError("no retain texts to cycle through")
        self.texts, self.max_length, self.pad_id = texts, max_length, pad_id
        self.rank, self.world = rank_world()
        self.global_batch = per_rank * self.world
        self.cursor = 0

    def next_rows(self) -> tuple[list[list[int]], list[bool]]:
        """This rank's slots of the next global batch and which of them are real."""
        per = -(-self.global_batch // self.world)
        slots = range(self.rank * per, (self.rank + 1) * per)
        rows = [self.texts[(self.cursor + i) % len(self.texts)][: self.max_length] for i in slots]
        self.cursor = (self.cursor + self.global_batch) % len(self.texts)
        return rows, [i < self.global_batch for i in slots]

    def loss(self, model: Any, device: torch.device) -> torch.Tensor:
        """This rank's share of the next global batch's mean per-text NLL under ``model``."""
        rows, valid = self.next_rows()
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll = per_sample_nll(logits, ids.masked_fill(mask == 0, -100))
        weight = torch.tensor(valid, dtype=nll.dtype, device=nll.device)
        return (nll * weight).sum() * self.world / self.global_batch

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "global_batch": self.global_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.cursor, self.global_batch = int(state_dict["cursor"]), int(state_dict["global_batch"])
