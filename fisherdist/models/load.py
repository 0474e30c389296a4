"""Load a Hugging Face causal LM and its tokenizer from a LOCAL directory (never the network).

Every user mistake (wrong path, a directory that is not a model, an unknown dtype) becomes one
``FisherdistError`` line naming the path or value, instead of a hub-lookup traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fisherdist.config import resolve_path
from fisherdist.distributed.collectives import DTYPES
from fisherdist.errors import FisherdistError
from fisherdist.integrity import check_model_dir


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise FisherdistError(f"unsupported model dtype {dtype} (expected one of {', '.join(DTYPES)})")
        return dtype
    if dtype not in DTYPES:
        raise FisherdistError(f"unknown model dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def model_dir(path: str | Path) -> Path:
    """The checked local model directory (``@world/...`` allowed): it must exist and hold a valid config.json."""
    p = resolve_path(path)
    if not p.is_dir():
        raise FisherdistError(f"model directory {p} does not exist")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise FisherdistError(f"{p} is not a Hugging Face model directory (no config.json)")
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FisherdistError(f"{cfg}: not valid JSON ({e})") from None
    check_model_dir(p)  # manifest (our outputs) or safetensors headers and sizes (a user's model)
    return p


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved beside the model, loaded offline."""
    from transformers import AutoTokenizer

    p = model_dir(path)
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FisherdistError(f"{p}: cannot load tokenizer ({str(e).splitlines()[0]})") from None


def load_model(path: str | Path, dtype: str | torch.dtype = "float32") -> Any:
    """The causal LM in ``dtype`` (eval mode), loaded offline."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per rank is noise; our commands show their own progress
    p, dt = model_dir(path), to_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dt, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise FisherdistError(f"{p}: cannot load model ({str(e).splitlines()[0]})") from None
    return model.eval()


def load_model_and_tokenizer(path: str | Path, dtype: str | torch.dtype = "float32") -> tuple[Any, Any]:
    """Model and tokenizer from one local directory (``@world/model`` = the shipped tiny world)."""
    return load_model(path, dtype), load_tokenizer(path)
