"""galore-torch's AdamW update for a whole param group at once.

With bias correction (the default) the moments and the update run in torch's fused Adam kernel, one pass
over each tensor: galore-torch's step lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps) is torch's
Adam step with eps / sqrt(1 - b2^t) in place of eps (identical maths). Without it, ``torch._foreach_*``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def apply(targets: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
          group: dict[str, Any], steps: list[int]) -> None:
    """targets -= step size * m / (sqrt(v) + eps) after updating m and v from ``grads`` in place.

    ``steps`` are the steps just taken (from 1); the ``step`` tensors in ``states`` must already hold them.
    """
    exp_avgs = [state["exp_avg"] for state in states]
    exp_avg_sqs = [state["exp_avg_sq"] for state in states]
    beta1, beta2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    if not group["correct_bias"]:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(targets, exp_avgs, denoms, -float(group["lr"]))
        return
    for step in sorted(set(steps)):  # one bucket unless some parameters skipped steps
        pick = [i for i, s in enumerate(steps) if s == step]
        torch._fused_adam_([targets[i] for i in pick], [grads[i] for i in pick], [exp_avgs[i] for i in pick],
                           [exp_avg_sqs[i] for i in pick], [], [states[i]["step"] for i in pick],
                           lr=float(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=0.0,
                           eps=eps / math.sqrt(1.0 - beta2 ** step), amsgrad=False, maximize=False)


def decay(targets: list[torch.Tensor], group: dict[str, Any]) -> None:
    """Decoupled weight decay after the step: W <- W - lr * wd * W."""
    if group["weight_decay"] > 0.0:
        torch._foreach_add_(targets, targets, alpha=-float(group["lr"]) * float(group["weight_decay"]))
