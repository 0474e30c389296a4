"""Losses whose gradients define each estimator: per-sample mean token NLL, with data, sampled or argmax labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's mean token negative log-likelihood, ``(B,)``; labels shifted as in HF causal LMs.

    A sample with no label token gets 0 (and contributes no gradient).
    """
    logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none")
    nll = nll.view(target.shape)
    counts = (target != -100).sum(dim=1)
    return nll.sum(dim=1) / counts.clamp_min(1)


def model_labels(logits: torch.Tensor, labels: torch.Tensor, source: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels for the true Fisher (``sampled`` from the model) or pseudo-label Fisher (``argmax``).

    Positions ignored in ``labels`` stay ignored, so the same tokens are scored as for the empirical Fisher.
    """
    if source == "data":
        return labels
    with torch.no_grad():
        pred_logits = logits[:, :-1].detach().float()
        if source == "argmax":
            drawn = pred_logits.argmax(dim=-1)
        elif source == "sampled":
            probs = pred_logits.softmax(dim=-1).reshape(-1, pred_logits.shape[-1])
            drawn = torch.multinomial(probs, 1, generator=generator).view(pred_logits.shape[:-1])
        else:
            raise ValueError(f"unknown label source {source!r}")
        out = labels.clone()
        out[:, 1:] = torch.where(labels[:, 1:] == -100, labels[:, 1:], drawn)
        return out
