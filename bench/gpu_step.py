"""One GPU benchmark section per call: step time and peak memory against ``fisherdist plan``'s prediction.

    python bench/gpu_step.py --section engine --out bench/results/gpu_step.json     # Llama-2-7B shape, bf16
    python bench/gpu_step.py --section suv --out bench/results/gpu_step.json
    python bench/gpu_step.py --section ngalore --out bench/results/gpu_step.json   # Llama-3.2-1B shape
    python bench/gpu_step.py --section lqlora --out bench/results/gpu_step.json    # one 4096 x 4096 matrix
    python bench/gpu_step.py --section vila --out bench/results/gpu_step.json      # importance pass, 1B shape
    python bench/gpu_step.py --section agl --out bench/results/gpu_step.json       # penalties, 7B q,k,v,o shapes
    python bench/gpu_step.py --table --out bench/results/gpu_step.json              # the table of a run
    python bench/gpu_step.py --section engine --smoke --out /tmp/g.json             # tiny world model on CPU
    python bench/gpu_step.py --section engine,suv --table --out /tmp/g.json         # several, then the table

``bench/gpu.sh`` runs every section under its own timeout. Each call merges its section into the JSON
file (written atomically before and after the section, so a cut run still reports what finished and marks
what was cut as ``started``). Sections: ``engine`` (plain step vs Fisher accumulation at batch /
microbatch / sample granularity), ``suv`` (LoRA step vs LoRA step with SUV's Fisher log barrier), and
``ngalore`` / ``lqlora`` / ``vila`` / ``agl`` (``bench/gpu_methods.py``).
Models have random weights and activation checkpointing per decoder layer, as the planner assumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_methods  # bench/, next to this script (the script directory is on sys.path)

WORLD_MODEL = Path(__file__).resolve().parents[1] / "fisherdist" / "world" / "default" / "model"
TARGETS = "model.layers.*.self_attn.*_proj.weight,model.layers.*.mlp.*_proj.weight"
GIB = 2**30


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from fisherdist.plan.model import load_model

    config = load_model(args.model).config
    config._attn_implementation = "sdpa"
    config.use_cache = False
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config).to(args.dtype)
    with warnings.catch_warnings():  # renamed activation_checkpointing_enable in transformers 5; this works in 4.x too
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(step: Callable[[], None], args: argparse.Namespace) -> dict[str, Any]:
    """Median step time after one warm-up step, and the peak memory over the timed steps."""
    step()
    reset_peak(args.device)
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "peak_gib": peak_gib(args.device)}


def planned_gib(args: argparse.Namespace, *extra: str, without_fisher: bool = False) -> float:
    """``fisherdist plan``'s per-rank total for this one-process run (``without_fisher``: less the Fisher
    state and the statistics in flight, i.e. the plain step)."""
    from fisherdist.plan.cli import add_arguments, compute

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dtype = str(args.dtype).removeprefix("torch.")
    plan_args = parser.parse_args(["--model", args.model, "--backend", "none", "--gpus-per-node", "1", "--dtype", dtype,
                                   "--micro-batch", str(args.batch), "--seq", str(args.seq), *extra])
    doc = compute(plan_args)
    fisher = doc["per_rank_bytes"]["fisher"] + doc["transient_bytes"]["fisher_in_flight"] if without_fisher else 0
    return float(doc["per_rank_bytes"]["total"] - fisher) / GIB


def engine(args: argparse.Namespace) -> dict[str, Any]:
    """Plain SGD steps vs steps that also accumulate the diagonal Fisher of the attention / MLP weights."""
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.fisher import FisherAccumulator, FisherSpec
    from fisherdist.fisher.loss import per_sample_nll

    model = build(args)
    w = wrap_model(model, "none", lambda ps: torch.optim.SGD(ps, lr=1e-6))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)

    def step(acc: FisherAccumulator | None = None) -> None:
        if acc is None:
            w.backward(per_sample_nll(w.module(input_ids=ids).logits, ids).mean())
        else:
            with acc.record(ids, loss_scale=1.0 / args.batch):
                w.backward(per_sample_nll(w.module(input_ids=ids).logits, ids).mean())
            acc.step()
        w.step()

    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()), "plain": timed(step, args)}
    out["plain"]["planned_gib"] = planned_gib(args, "--method", "fisher", "--optimizer", "sgd", "--granularity", "batch",
                                              without_fisher=True)
    for gran in ("batch", "microbatch", "sample"):
        acc = FisherAccumulator(w, FisherSpec(granularity=gran, params=TARGETS.split(",")))
        res = timed(lambda acc=acc: step(acc), args)
        res["ratio"] = res["median_s"] / out["plain"]["median_s"]
        res["planned_gib"] = planned_gib(args, "--method", "fisher", "--optimizer", "sgd", "--granularity", gran,
                                         "--params", TARGETS)
        out[gran] = res
        acc.close()
        del acc
    return out


def suv(args: argparse.Namespace) -> dict[str, Any]:
    """LoRA (r 8, q,k,v,o) AdamW steps, without and with SUV's differential-Fisher log barrier."""
    from fisherdist.fisher.layout import Fragment
    from fisherdist.fisher.loss import per_sample_nll
    from fisherdist.methods.suv.regularizer import FisherBarrier
    from fisherdist.models.peft_utils import LoraSettings, adapted_modules, apply_lora

    model = apply_lora(build(args), LoraSettings(dropout=0.0))
    modules = adapted_modules(model)
    frags, forbid, retain = {}, {}, {}
    for m in modules:
        shape = tuple(m.module.base_layer.weight.shape)
        frags[m.base_weight_fqn] = Fragment(m.base_weight_fqn, shape, 0, shape[0] * shape[1])
        forbid[m.base_weight_fqn] = torch.rand(shape[0] * shape[1], device=args.device)
        retain[m.base_weight_fqn] = torch.rand(shape[0] * shape[1], device=args.device)
    barrier = FisherBarrier.build(modules, forbid, retain, frags, eps1=1e-6, eps2=1e-6)
    del forbid, retain
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)

    def step(regularise: bool) -> None:
        loss = per_sample_nll(model(input_ids=ids).logits, ids).mean()
        if regularise:
            loss = loss + barrier.loss_term(0.1)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out: dict[str, Any] = {"lora": timed(lambda: step(False), args), "lora_suv": timed(lambda: step(True), args)}
    out["lora_suv"]["ratio"] = out["lora_suv"]["median_s"] / out["lora"]["median_s"]
    pairs = max(1, args.batch // 2)  # the planner's SUV micro-batch counts preference pairs (2 sequences)
    out["lora_suv"]["planned_gib"] = planned_gib(args, "--method", "suv", "--micro-batch", str(pairs))
    return out


def ngalore(args: argparse.Namespace) -> dict[str, Any]:
    args.model = str(WORLD_MODEL) if args.smoke else "llama-3.2-1b"
    return gpu_methods.ngalore(args, build, timed, planned_gib)


def vila(args: argparse.Namespace) -> dict[str, Any]:
    args.model = str(WORLD_MODEL) if args.smoke else "llama-3.2-1b"
    return gpu_methods.vila(args, build, timed, planned_gib)


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "engine": engine, "suv": suv, "ngalore": ngalore, "lqlora": gpu_methods.lqlora, "vila": vila,
    "agl": lambda args: gpu_methods.agl(args, timed)}


def save(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def table(doc: dict[str, Any]) -> str:
    """A Markdown table: every measured case of every section."""
    lines = ["| section | case | median step (s) | ratio | peak (GiB) | planned (GiB) |", "|---|---|---|---|---|---|"]
    for section in SECTIONS:
        for case, r in doc.get(section, {"(missing)": {}}).items():
            if isinstance(r, dict):
                cells = [r.get(k) for k in ("median_s", "ratio", "peak_gib", "planned_gib")]
                text = ["-" if c is None else f"{c:.4g}" for c in cells]
                lines.append(f"| {section} | {case} | " + " | ".join(text) + " |")
            else:
                lines.append(f"| {section} | {case} | {r} | | | |")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", help=f"one or more of {','.join(SECTIONS)}, comma-separated, run in order")
    p.add_argument("--table", action="store_true", help="print the Markdown table of --out (after the sections)")
    p.add_argument("--out", default="bench/results/gpu_step.json")
    p.add_argument("--smoke", action="store_true", help="tiny world model, CPU, 2 steps: the code path in seconds")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    smoke = {"model": str(WORLD_MODEL), "device": "cpu", "dtype": torch.float32, "batch": 2, "seq": 16, "steps": 1}
    full = {"model": "llama-2-7b", "device": "cuda", "dtype": torch.bfloat16, "batch": 4, "seq": 256, "steps": args.steps}
    for key, value in (smoke if args.smoke else full).items():
        setattr(args, key, value)
    if args.smoke:
        torch.set_num_threads(1)  # a shared CPU: one thread per process is faster than oversubscribing
    if not args.table and not args.section:
        p.error("give --section or --table")
    args.sections = args.section.split(",") if args.section else []
    unknown = [x for x in args.sections if x not in SECTIONS]
    if unknown:
        p.error(f"--section: unknown {', '.join(unknown)}; expected some of {','.join(SECTIONS)}")
    return args


def main() -> None:
    args = parse()
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    for section in args.sections:  # the JSON is rewritten before and after each, so a cut run still reports
        doc["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (smoke)"
        doc[section] = {"status": "started"}
        save(out, doc)
        doc[section] = SECTIONS[section](vars_copy(args))
        save(out, doc)
        print(json.dumps({section: doc[section]}, indent=1))
    if args.table:
        print(table(doc))


def vars_copy(args: argparse.Namespace) -> argparse.Namespace:
    """Sections set ``args.model`` for themselves: each starts from the parsed options."""
    return argparse.Namespace(**vars(args))


if __name__ == "__main__":
    main()
