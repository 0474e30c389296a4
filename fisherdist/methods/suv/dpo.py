"""Moved to :mod:`fisherdist.recipes.losses` (the losses every method shares); kept for ``suv/train.py``."""

from fisherdist.recipes.losses import collate_pairs, dpo_loss, reference_logprobs, sequence_logprobs

__all__ = ["collate_pairs", "dpo_loss", "reference_logprobs", "sequence_logprobs"]
