"""AdamW vs GaLore vs Natural GaLore on the tiny world, in ONE run: loss curves at equal steps, optimizer
step time (normal and refresh steps) and optimizer-state memory per rank by part, for 1 and 2 ranks, with
galore-torch's GaLoreAdamW alongside for reference.

    python bench/optimizers.py --out bench/results/optimizers.json

Pre-trains the tiny world's Llama architecture (fisherdist/world/default/model/config.json, freshly
initialised) on the world's general_train text, single process, one thread. GaLore groups follow the
reference code: nn.Linear weights inside attention and MLP modules; embeddings, norms and lm_head get
AdamW inside the same optimizer. The 2-rank part runs FSDP2 (ours, torch AdamW) and DDP (galore-torch,
which needs whole matrices; ours in owner mode) on gloo and reports each rank's state bytes and step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = Path(__file__).resolve().parents[1] / "fisherdist" / "world" / "default"
SETTINGS = {"steps": 100, "batch": 8, "seq": 64, "gap": 25, "rank": 64, "scale": 0.25, "galore_lr": 1e-2,
            "adamw_lr": 3e-3, "history": 4, "history_dtype": "bfloat16", "damping": 1e-3}


def build_model(seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(AutoConfig.from_pretrained(WORLD / "model"))


def token_batches(split: str, count: int, batch: int, seq: int) -> list[torch.Tensor]:
    """``count`` batches of ``batch`` x ``seq`` token ids cut from the split's concatenated text (cycled)."""
    from fisherdist.data.batches import load_texts
    from fisherdist.models.load import load_tokenizer

    tokenizer = load_tokenizer(WORLD / "model")
    stream = [i for text in load_texts(WORLD / "data" / f"{split}.jsonl", "text") for i in tokenizer(text)["input_ids"]]
    chunks = torch.tensor(stream[: len(stream) // seq * seq]).view(-1, seq)
    order = torch.randperm(chunks.shape[0], generator=torch.Generator().manual_seed(0))
    need = order.repeat(-(-count * batch // order.numel()))[: count * batch]
    return list(chunks[need].view(count, batch, seq))


def galore_groups(model: torch.nn.Module, rank: int) -> list[dict[str, Any]]:
    """Attention / MLP Linear weights projected (reference ``get_galore_params``); the rest plain AdamW."""
    low = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
           and ("attn" in n or "mlp" in n)]
    ids = {id(p) for p in low}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": low, "rank": rank, "update_proj_gap": SETTINGS["gap"], "scale": SETTINGS["scale"],
             "proj_type": "std"}, {"params": rest}]


def make_optimizer(name: str, model: torch.nn.Module, rank: int, ours: Any = None) -> torch.optim.Optimizer:
    """``adamw``, ``galore_torch``, ``galore``, ``natural`` (window in ``history_dtype``), ``natural_fp32``
    (window in the gradients' dtype, as configs/pretrain/tiny.yaml); a ``_randomized`` suffix picks GaLore 2's
    subspace. ``ours``: the package providing GaLore (default ``fisherdist.optim``; optimizers_fsdp2.py
    passes another revision's)."""
    if ours is None:
        import fisherdist.optim as ours

    lr = SETTINGS["galore_lr"]
    if name.endswith("_randomized"):
        opt = make_optimizer(name.removesuffix("_randomized"), model, rank, ours)
        opt.options["subspace"] = "randomized"  # type: ignore[attr-defined]
        return opt
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=SETTINGS["adamw_lr"])
    if name == "galore_torch":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(galore_groups(model, rank), lr=lr, no_deprecation_warning=True)
    if name == "galore":
        return ours.GaLoreAdamW(galore_groups(model, rank), lr=lr)
    window = None if name == "natural_fp32" else getattr(torch, SETTINGS["history_dtype"])  # fp32: the recipes'
    return ours.NaturalGaLoreAdamW(galore_groups(model, rank), lr=lr, history=SETTINGS["history"],
                                   damping=SETTINGS["damping"], history_dtype=window)


def state_parts(opt: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's optimizer-state bytes by part, for ours (``state_bytes``) and for torch / galore-torch."""
    if hasattr(opt, "state_bytes"):
        return dict(opt.state_bytes())
    parts = {"moments": 0, "projectors": 0, "history": 0}
    for state in opt.state.values():
        for key, value in state.items():
            tensor = getattr(value, "ortho_matrix", value)
            if isinstance(tensor, torch.Tensor) and key != "step":
                tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                parts["projectors" if key == "projector" else "moments"] += tensor.numel() * tensor.element_size()
    return parts


def step_times(times: list[float], gap: int, period: int) -> dict[str, float]:
    """Median normal step, mean refresh step (the first step, which also allocates, is left out), and the
    refresh cost amortised over ``period`` steps."""
    refresh = [t for i, t in enumerate(times) if i % gap == 0 and i > 0] or [times[0]]
    normal = statistics.median(t for i, t in enumerate(times) if i % gap != 0)
    return {"normal_s": normal, "refresh_s": statistics.mean(refresh),
            "amortised_refresh_s": (statistics.mean(refresh) - normal) / period}


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def curve(name: str, rank: int, train: list[torch.Tensor], heldout: list[torch.Tensor]) -> dict[str, Any]:
    model = build_model()
    opt = make_optimizer(name, model, rank)
    losses, times = [], []
    for ids in train:
        loss = lm_loss(model, ids)
        loss.backward()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    with torch.no_grad():
        held = statistics.mean(float(lm_loss(model, ids)) for ids in heldout)
    return {"optimizer": name, "rank": rank, "losses": losses, "heldout_loss": held,
            "state_bytes": state_parts(opt), "times": step_times(times, SETTINGS["gap"], SETTINGS["gap"])}


DISTRIBUTED = [("adamw", "fsdp2"), ("galore", "fsdp2"), ("natural", "fsdp2"), ("galore_torch", "ddp"),
               ("galore", "ddp"), ("natural", "ddp")]


def wrap(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    if backend == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:  # type: ignore[union-attr]
        fully_shard(layer)
    fully_shard(model)
    return model


def ranked(rank: int, world: int, gap: int, steps: int) -> list[dict[str, Any]]:
    """Each optimizer under its 2-rank backend: this rank's state bytes and step times (gap ``gap``)."""
    torch.set_num_threads(1)
    period, results = SETTINGS["gap"], []
    SETTINGS["gap"] = gap
    batches = token_batches("general_train", steps, SETTINGS["batch"], SETTINGS["seq"])
    for name, backend in DISTRIBUTED:
        model = wrap(build_model(), backend)
        opt = make_optimizer(name, model, SETTINGS["rank"])
        times = []
        for ids in batches:
            lm_loss(model, ids.tensor_split(world)[rank]).backward()
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
            opt.zero_grad(set_to_none=True)
        results.append({"optimizer": name, "backend": backend, "state_bytes": state_parts(opt),
                        "times": step_times(times, gap, period)})
    return results


def equal_bytes_rank(reference: int) -> int:
    """The largest Natural GaLore rank whose total state (history included) fits GaLore's at ``reference``."""
    def total(name: str, rank: int) -> int:
        model = build_model()
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = make_optimizer(name, model, rank)
        opt.step()
        return sum(state_parts(opt).values())

    budget = total("galore", reference)
    fits = [r for r in range(8, reference + 1, 8) if total("natural", r) <= budget]
    return max(fits)


def timing(names: list[tuple[str, str, int]], reps: int, refresh_reps: int) -> dict[str, dict[str, float]]:
    """Step times measured interleaved (one step of each optimizer in turn, so load from other jobs hits
    all alike): median non-refresh step and median refresh step, wall and this thread's CPU time, on the
    gradients of one real batch; the refresh cost amortised over the bench's T and the recipes' T = 200."""
    ids = token_batches("general_train", 1, SETTINGS["batch"], SETTINGS["seq"])[0]
    runs = {}
    for label, name, rank in names:
        model = build_model()
        lm_loss(model, ids).backward()
        runs[label] = (model, make_optimizer(name, model, rank))
        runs[label][1].step()  # the first step allocates state and takes the first subspace
    samples: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": [], "rwall": [], "rcpu": []} for k in runs}
    for i in range(reps + refresh_reps):
        refresh = i >= reps
        for label, (_, opt) in runs.items():
            gap = 1 if refresh else 10 ** 9
            for group in opt.param_groups:
                if "rank" in group:
                    group["update_proj_gap"] = gap
            for state in opt.state.values():  # galore-torch keeps the gap in its projector
                if hasattr(state.get("projector"), "update_proj_gap"):
                    state["projector"].update_proj_gap = gap
            wall, cpu = time.perf_counter(), time.thread_time()
            opt.step()
            samples[label]["rwall" if refresh else "wall"].append(time.perf_counter() - wall)
            samples[label]["rcpu" if refresh else "cpu"].append(time.thread_time() - cpu)
    out = {}
    for label, s in samples.items():
        med = {k: statistics.median(v) for k, v in s.items()}
        out[label] = {"normal_wall_s": med["wall"], "normal_cpu_s": med["cpu"], "refresh_wall_s": med["rwall"],
                      "refresh_cpu_s": med["rcpu"], "state_bytes": sum(state_parts(runs[label][1]).values())}
    return out


def targets(curves: dict[str, dict[str, Any]], times: dict[str, dict[str, float]], adamw_bytes: int,
            period: int) -> dict[str, Any]:
    """The issue's four targets, each with the numbers it is judged on (times: CPU-time medians)."""
    nat, eq, gal = curves["natural"], curves["natural_equal_bytes"], curves["galore"]
    base = times["adamw"]["normal_cpu_s"]
    out: dict[str, Any] = {
        "natural_equal_bytes_beats_galore": {"natural": eq["heldout_loss"], "galore": gal["heldout_loss"],
                                             "met": eq["heldout_loss"] < gal["heldout_loss"]},
        # the issue judges the state "at the recipe's defaults": configs/pretrain/tiny.yaml (rank 32, fp32 window)
        "state_below_0.7x_adamw": {"recipe_ratio": times["natural_recipe_tiny"]["state_bytes"] / adamw_bytes,
                                   "rank64_bf16_ratio": sum(nat["state_bytes"].values()) / adamw_bytes,
                                   "met": times["natural_recipe_tiny"]["state_bytes"] < 0.7 * adamw_bytes},
    }
    for label, t in times.items():
        step = t["normal_cpu_s"] / base
        for T in (period, 200):
            amortised = (t["refresh_cpu_s"] - t["normal_cpu_s"]) / T / base
            out.setdefault(label, {})[f"amortised_refresh_T{T}_x_adamw"] = round(amortised, 3)
        out[label]["normal_step_x_adamw"] = round(step, 3)
        out[label]["normal_step_met_1.3x"] = step <= 1.3
    return out


def plot(curves: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        smooth = [statistics.mean(c["losses"][max(0, i - 9): i + 1]) for i in range(len(c["losses"]))]
        mib = sum(c["state_bytes"].values()) / 2 ** 20
        rank = "" if name == "adamw" else f"rank {c['rank']}, "
        ax.plot(smooth, label=f"{name} ({rank}state {mib:.1f} MiB)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title("tiny-world Llama pre-training, equal steps (galore_torch lies under galore)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    from tests.distributed import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/optimizers.json")
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    parser.add_argument("--reps", type=int, default=21, help="interleaved non-refresh steps timed per optimizer")
    parser.add_argument("--refresh-reps", type=int, default=5, help="interleaved refresh steps timed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = token_batches("general_train", args.steps, SETTINGS["batch"], SETTINGS["seq"])
    heldout = token_batches("general_heldout", 4, SETTINGS["batch"], SETTINGS["seq"])
    eq_rank = equal_bytes_rank(SETTINGS["rank"])
    r = SETTINGS["rank"]
    runs = [("adamw", r), ("galore_torch", r), ("galore", r), ("natural", r), ("natural_randomized", r),
            ("natural_equal_bytes", eq_rank)]
    curves = {label: curve(label.replace("_equal_bytes", ""), rank, train, heldout) for label, rank in runs}
    timed = [(label, label.replace("_equal_bytes", ""), rank) for label, rank in runs] + \
        [("galore_randomized", "galore_randomized", r), ("natural_equal_bytes_randomized", "natural_randomized", eq_rank),
         ("natural_recipe_tiny", "natural_fp32", 32)]  # configs/pretrain/tiny.yaml: rank 32, s = 4, fp32 window
    times = timing(timed, args.reps, args.refresh_reps)
    ranks2 = run_distributed(ranked, 2, 10, 21, timeout=1800)
    adamw_bytes = sum(curves["adamw"]["state_bytes"].values())
    report = {"settings": SETTINGS, "steps": args.steps, "machine": "2-core CPU, 1 thread per process",
              "date": time.strftime("%Y-%m-%d"), "curves": curves, "times": times, "two_ranks": ranks2,
              "targets": targets(curves, times, adamw_bytes, SETTINGS["gap"])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(curves, out.with_suffix(".png"))
    print(json.dumps(report["targets"], indent=1))


if __name__ == "__main__":
    main()
