"""``fisherdist slurm submit CONFIG ...`` (render + sbatch) and ``fisherdist reshard SRC DST``.

Resharding: DCP already reshards on load (save on 8 ranks, resume on 16). ``reshard`` makes it explicit
and offline: one process reads every shard (``dcp_to_torch_save``, no process group), then re-saves the
whole tensors as a one-file DCP checkpoint under ``DST/step-N`` with a fresh ``run.json``/``.complete``,
which any world size loads. ``--export-hf DIR`` also writes the model weights found in the checkpoint
(a ``*.model.<fqn>`` sub-dict, as :class:`ModelOptimizerState` saves it): full weights (a base a method
rewrote, e.g. W - s*B*A) as ``model.safetensors``, LoRA factors as a PEFT ``adapter_model.safetensors``,
both when both are there (and ``--lora-scale`` adds the merged model in ``DIR/merged``), plus the base
model's config/tokenizer files when ``--base`` names the Hugging Face directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fisherdist.atomic import atomic_dir
from fisherdist.errors import CheckpointError, FisherdistError
from fisherdist.integrity import hash_files

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip


def _resolve_source(src: Path) -> Path:
    from fisherdist.distributed.checkpoint import RunCheckpointer

    if (src / ".metadata").is_file():
        return src
    latest = RunCheckpointer(src).latest()
    if latest is None:
        raise CheckpointError(f"{src}: neither a DCP checkpoint (.metadata) nor a run directory with a complete step-N")
    return latest


def read_full(src: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every tensor of a checkpoint, whole, in this process: ``(nested state dict, run.json)``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from fisherdist.distributed.checkpoint import verify_checkpoint

    meta = verify_checkpoint(src) if (src / ".complete").is_file() else {"step": 0, "extra": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "full.pt")
        try:
            dcp_to_torch_save(str(src), out)
        except Exception as e:
            raise CheckpointError(f"{src}: cannot read the shard files ({str(e).strip().splitlines()[-1][:200]})") from None
        return torch.load(out, weights_only=False), meta


def reshard(src: Path, dst: Path) -> Path:
    """Re-save ``src`` as a world-size-independent one-file checkpoint ``dst/step-N``; return its path."""
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from fisherdist.distributed.checkpoint import COMPLETE, RUN_META

    src = _resolve_source(src)
    state, meta = read_full(src)
    step = int(meta.get("step", 0))
    final = dst / f"step-{step}"
    if final.exists():
        raise FisherdistError(f"{final}: already exists (choose an empty DST)")
    tmp = dst / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dcp_save(state, checkpoint_id=str(tmp), no_dist=True)
    new_meta = {**meta, "world_size": 1, "resharded_from": str(src), "files": hash_files(tmp)}
    (tmp / RUN_META).write_text(json.dumps(new_meta, indent=1))
    (tmp / COMPLETE).write_text(f"step {step}\n")
    tmp.rename(final)
    return final


def _model_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    found = [v["model"] for v in state.values() if isinstance(v, dict) and isinstance(v.get("model"), dict)]
    if not found:
        raise CheckpointError(f"checkpoint holds no model weights (top-level keys: {', '.join(sorted(state))})")
    return {k: v.detach().cpu().contiguous() for k, v in found[0].items() if isinstance(v, torch.Tensor)}


def _hf_name(fqn: str) -> str:
    """A PEFT model's FQN of a frozen weight -> its name in a plain HF checkpoint."""
    return fqn.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _merged(frozen: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """W + scale * B @ A (float64, then W's dtype) for every adapted weight; the others as they are."""
    out = dict(frozen)
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b, w = lora[key.replace(".lora_A.", ".lora_B.")], frozen[f"{module}.base_layer.weight"]
        out[f"{module}.base_layer.weight"] = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
    return out


def export_hf(src: Path, out: Path, base: Path | None = None, lora_scale: float | None = None) -> Path:
    """Consolidated Hugging Face directory from a checkpoint: the full weights found (``model.safetensors``,
    a rewritten base included) and the LoRA factors as a PEFT ``adapter_model.safetensors``; with both and
    ``lora_scale`` (alpha / r) also ``out/merged`` (base + scale * B @ A). Returns the adapter's path, if
    any, else the model file's."""
    from safetensors.torch import save_file

    state, _ = read_full(_resolve_source(src))
    weights = _model_weights(state)
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    frozen = {k: v for k, v in weights.items() if "lora_" not in k}
    with atomic_dir(out) as tmp:  # complete with its manifest, or not there
        if frozen:
            save_file({_hf_name(k): v for k, v in frozen.items()}, str(tmp / "model.safetensors"))
        if frozen and lora and lora_scale is not None:
            (tmp / "merged").mkdir()
            merged = _merged(frozen, lora, lora_scale)
            save_file({_hf_name(k): v for k, v in merged.items()}, str(tmp / "merged" / "model.safetensors"))
            _copy_hf_files(base, tmp / "merged")
        if lora:  # PEFT's file naming: no adapter name in the keys
            save_file({k.replace(".default", ""): v for k, v in lora.items()}, str(tmp / "adapter_model.safetensors"))
        _copy_hf_files(base, tmp)
    return out / ("adapter_model.safetensors" if lora else "model.safetensors")


def _copy_hf_files(base: Path | None, out: Path) -> None:
    if base is None:
        return
    for name in HF_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)


def _submit(args: argparse.Namespace) -> int:
    from fisherdist.distributed.slurm import JobShape, render, submit

    if not Path(args.config).is_file():
        raise FisherdistError(f"{args.config}: config file not found")
    shape = JobShape(args.nodes, args.gpus_per_node, args.procs_per_node, args.cpus_per_task, args.time,
                     args.partition, args.job_name)  # fmt: skip
    script = render(args.template, shape, Path(args.template_dir) if args.template_dir else None)
    job_args = [args.command, args.config, *args.overrides]
    if args.dry_run:
        print(script, end="")
        print(f"# sbatch arguments: {' '.join(job_args)}")
        return 0
    print(submit(script, job_args, Path.cwd()))
    return 0


def _reshard(args: argparse.Namespace) -> int:
    from fisherdist.commands import check_writable

    src, dst = Path(args.src), Path(args.dst)
    check_writable(dst, "DST")  # before reading anything: a bad destination fails in seconds
    if args.export_hf:
        check_writable(args.export_hf, "--export-hf")
    path = reshard(src, dst)
    print(f"wrote {path}")
    if args.export_hf:
        print(f"wrote {export_hf(path, Path(args.export_hf), Path(args.base) if args.base else None, args.lora_scale)}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("slurm", help="submit a run to Slurm from the templates in slurm/")
    ssub = s.add_subparsers(dest="slurm_command", required=True, metavar="SUBCOMMAND")
    p = ssub.add_parser("submit", help="render slurm/<template>.sbatch for a job size and sbatch it (prints the job id)")
    p.add_argument("config", help="recipe YAML passed to the command")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides passed to the command")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU job (then give --procs-per-node)")
    p.add_argument("--procs-per-node", type=int, default=None, help="processes per node (default: --gpus-per-node)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--template", default="torchrun", choices=["torchrun", "deepspeed", "srun"])
    p.add_argument("--template-dir", default=None, help="directory with the *.sbatch templates (default: slurm/)")
    p.add_argument("--command", default="fisher", help="fisherdist command the job runs (default: fisher)")
    p.add_argument("--time", default=None, help="Slurm time limit, e.g. 04:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--job-name", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the rendered script instead of submitting")
    p.set_defaults(func=_submit)
    r = sub.add_parser("reshard", help="re-save a run checkpoint for any world size (one process), optionally as HF/PEFT")
    r.add_argument("src", help="a checkpoint directory (step-N) or a run's checkpoint directory (its latest is used)")
    r.add_argument("dst", help="new run checkpoint directory (gets step-N)")
    r.add_argument("--export-hf", default=None, metavar="DIR", help="also write the model weights as a HF/PEFT directory")
    r.add_argument("--base", default=None, metavar="DIR", help="HF model directory to copy config/tokenizer files from")
    r.add_argument("--lora-scale", type=float, default=None, metavar="S",
                   help="LoRA alpha / r: with base weights and LoRA factors in the checkpoint, also write DIR/merged")
    r.set_defaults(func=_reshard)
