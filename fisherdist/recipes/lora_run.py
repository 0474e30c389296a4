"""The model side of a LoRA training run, shared by every method: the wrapped training model (built once
per invocation and shared by its stages), a plain model to generate with, and the streamed export."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fisherdist.errors import FisherdistError
from fisherdist.recipes.stages import RunContext
from fisherdist.recipes.train_config import OptimSettings

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def adamw(t: OptimSettings) -> OptimizerFactory:
    """``torch.optim.AdamW`` with the stage's lr and weight decay."""
    return lambda ps: torch.optim.AdamW(ps, lr=t.lr, weight_decay=t.weight_decay)


def training_model(r: RunContext[Any], t: OptimSettings, optimizer: OptimizerFactory | None = None,
                   lora_init: Callable[[torch.nn.Module], None] | None = None, random_init: bool = False) -> Any:
    """Base model (``random_init``: fresh weights from its config, seeded) + LoRA (``r.cfg.lora``, PEFT's init,
    then ``lora_init``: a method's own factors and base rewrite; no ``lora``: every weight trains), wrapped
    for the run's backend with the optimizer; built once, kept in ``r.state["wrapped"]`` (the model in
    ``r.state["model"]``, for an optimizer factory that names its parameters)."""
    if "wrapped" not in r.state:
        from fisherdist.models.sharded_load import load_wrapped

        m = r.cfg.model
        r.state["wrapped"] = load_wrapped(m.path, r.dtype, r.cfg.dist.backend, r.env.device, load=m.load,
                                          prepare=partial(_prepare, r, random_init, t.seed),
                                          optimizer_factory=optimizer or adamw(t), seed=t.seed, lora_init=lora_init,
                                          **r.cfg.backend_options(t.batch_size, t.max_grad_norm))
    return r.state["wrapped"]


def _prepare(r: RunContext[Any], random_init: bool, seed: int, model: torch.nn.Module) -> torch.nn.Module:
    from fisherdist.models.peft_utils import apply_lora

    if random_init:
        random_weights(model, seed)
    lora = getattr(r.cfg, "lora", None)
    r.state["model"] = apply_lora(model, lora) if lora is not None else model
    return r.state["model"]


@torch.no_grad()
def random_weights(model: torch.nn.Module, seed: int) -> None:
    """Fresh weights, the same on every rank: each matrix ~ N(0, config.initializer_range^2) drawn in
    parameter order from a generator seeded with ``seed``, 1-D weights (norms) 1, biases 0."""
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
        else:
            p.fill_(0.0 if name.endswith("bias") else 1.0)


def plain_model(r: RunContext[Any], path: str | Path) -> Any:
    """The model at ``path`` to generate with, sharded as this run's config says (see ``load_for_generation``)."""
    from fisherdist.models.sharded_load import load_for_generation

    if not (Path(path) / "config.json").is_file():
        raise FisherdistError(f"no Hugging Face model directory at {path} (run the earlier stages first)")
    return load_for_generation(path, r.dtype, r.env.device, r.cfg.model.load, r.cfg.dist.backend)


def export_trained(r: RunContext[Any], wrapped: Any, merged_name: str, rewritten: bool = False) -> Path:
    """``out/models/{base,adapter,<merged_name>}`` of the trained adapter (see ``models.export.export_lora``),
    or ``out/models/trained`` (the live weights, streamed) of a run without LoRA."""
    from fisherdist.models.export import export_lora
    from fisherdist.models.lora_base import export_base

    models = r.out / "models"
    if getattr(r.cfg, "lora", None) is None:
        return export_base(wrapped.unwrapped, r.cfg.model.path, models / "trained", merge=False)
    export_lora(wrapped.unwrapped, r.cfg.model.path, models, merged_name, rewritten=rewritten, dtype=r.dtype,
                base_copy=r.cfg.base_copy)
    return models / merged_name
