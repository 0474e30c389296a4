"""The model a plan is for: an HF ``config.json`` (shipped or local), built on the meta device.

No weights are read or allocated: ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")`` gives
every parameter's name and shape, which is all the memory arithmetic needs.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fisherdist.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent / "models"


def shipped_models() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.json"))


@dataclass(frozen=True)
class ModelShapes:
    """Parameter shapes in module order, the decoder-layer units FSDP wraps, and the buffers."""

    name: str
    config: Any
    shapes: dict[str, tuple[int, ...]]
    units: list[str]  # name prefix of each decoder layer (one FSDP unit each); the root unit holds the rest
    buffer_bytes: int

    def numel(self, fqns: list[str] | None = None) -> int:
        return sum(math.prod(self.shapes[f]) for f in (self.shapes if fqns is None else fqns))


def _read_config(name_or_path: str) -> tuple[str, dict[str, Any]]:
    path = Path(name_or_path)
    if (SHIPPED / f"{name_or_path}.json").is_file() and not path.exists():
        path = SHIPPED / f"{name_or_path}.json"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"--model: {name_or_path!r} is neither a shipped model ({', '.join(shipped_models())}) "
                          "nor an HF config.json or model directory")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--model: {path} is not a readable JSON config ({err})") from err
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"--model: {path} has no 'model_type' key; expected an HF config.json")
    return path.stem if path.parent == SHIPPED else str(path), raw


def _units(model: torch.nn.Module) -> list[str]:
    """The decoder layers FSDP / our wrappers shard as one unit each (``fisherdist.distributed.wrap``)."""
    from fisherdist.distributed.wrap import _transformer_blocks

    blocks = {id(b) for b in _transformer_blocks(model)}
    return [f"{name}." for name, module in model.named_modules() if id(module) in blocks]


def load_model(name_or_path: str) -> ModelShapes:
    """Shapes of a causal LM from its config; unknown names and unreadable configs are one-line errors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name, raw = _read_config(name_or_path)
    try:
        config = AutoConfig.for_model(**raw)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--model: {name}: transformers cannot build a causal LM from this config ({err})") from err
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return ModelShapes(name, config, shapes, _units(model), buffers)
