"""SUV-TV: add the task vectors of a Fisher-regularised and a projected model to the base.

W = W0 + (W_F - W0) + (W_P - W0) on the adapted projections (q,k,v,o); every other tensor is W0. The
README's ``--merge_alpha`` flag does not exist in the official code; ``weights`` generalises it.
"""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Sequence
from pathlib import Path

import torch

from fisherdist.errors import FisherdistError

DEFAULT_PATTERNS = ("*q_proj.weight", "*k_proj.weight", "*v_proj.weight", "*o_proj.weight")


def merge_task_vectors(
    base: dict[str, torch.Tensor], models: Sequence[dict[str, torch.Tensor]],
    patterns: Sequence[str] = DEFAULT_PATTERNS, weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """State dict W0 + sum_m w_m (W_m - W0) on tensors matching ``patterns`` (w_m = 1 by default)."""
    weights = list(weights) if weights is not None else [1.0] * len(models)
    out = {}
    for name, w0 in base.items():
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            out[name] = w0.clone()
            continue
        acc = w0.double().clone()
        for sd, w in zip(models, weights):
            if name not in sd or sd[name].shape != w0.shape:
                raise FisherdistError(f"merge: tensor {name} missing or shaped differently in a merged model")
            acc += w * (sd[name].double() - w0.double())
        out[name] = acc.to(w0.dtype)
    return out


def merge_model_dirs(base_dir: str | Path, model_dirs: Sequence[str | Path], out_dir: str | Path,
                     weights: Sequence[float] | None = None) -> Path:
    """Merge HF model directories (merged SUV outputs) into ``out_dir`` with the base's config/tokenizer."""
    from transformers import AutoModelForCausalLM

    from fisherdist.atomic import atomic_dir
    from fisherdist.models.export import copy_tokenizer
    from fisherdist.models.load import model_dir

    base = AutoModelForCausalLM.from_pretrained(model_dir(base_dir), dtype=torch.float32)
    sds = [AutoModelForCausalLM.from_pretrained(model_dir(d), dtype=torch.float32).state_dict() for d in model_dirs]
    base.load_state_dict(merge_task_vectors(base.state_dict(), sds, weights=weights))
    with atomic_dir(out_dir) as tmp:
        base.save_pretrained(tmp)
        copy_tokenizer(base_dir, tmp)
    return Path(out_dir)


def _merge_command(args: argparse.Namespace) -> int:
    from fisherdist.commands import check_writable

    check_writable(args.out, "--out")
    if args.weights is not None and len(args.weights) != len(args.models):
        raise FisherdistError(f"--weights: got {len(args.weights)} values for {len(args.models)} models")
    out = merge_model_dirs(args.base, args.models, args.out, args.weights)
    print(f"merged {len(args.models)} task vectors into {args.base} -> {out}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fisherdist merge MODEL... --base DIR --out DIR [--weights W...]`` (e.g. SUV-TV)."""
    m = sub.add_parser("merge", help="task-vector merge: W = W0 + sum_m w_m (W_m - W0) on q,k,v,o of HF models")
    m.add_argument("models", nargs="+", help="HF directories to merge, e.g. a Fisher-run and a projected-run models/unlearned")
    m.add_argument("--base", required=True, help="the original model directory W0")
    m.add_argument("--out", required=True, help="output HF directory")
    m.add_argument("--weights", type=float, nargs="+", help="one weight per model (default 1 each)")
    m.set_defaults(func=_merge_command)
