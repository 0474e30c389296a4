"""GaLore and Natural GaLore optimizers that run single process, under FSDP2 and under DDP.

``fisherdist.optim.GaLoreAdamW`` is a drop-in for ``galore_torch.GaLoreAdamW``;
``fisherdist.optim.NaturalGaLoreAdamW`` adds the low-rank empirical-Fisher step (README: "Optimizers").
"""

from fisherdist.optim.optimizer import GaLoreAdamW, NaturalGaLoreAdamW

__all__ = ["GaLoreAdamW", "NaturalGaLoreAdamW"]
