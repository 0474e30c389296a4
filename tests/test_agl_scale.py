"""AlignGuard-LoRA at scale (``model.load=sharded``): the stages ``train`` (the agl arm) and ``eval`` on 2 gloo
ranks under FSDP2 with row-sharded loading, against the same stages in one process with whole-model loading
(float64, shortened tiny world): the sharded load gives C, A_a and the LoRA factors the full load's values,
the run logs the same losses and penalties, the streamed merged export W + dW_A + dW_T holds the same
tensors, and the evaluation of the sharded models gives the same report. The merged export is also checked
against the live adapted model it came from (same logits, independently of the export code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from fisherdist import cli
from fisherdist.config import default_world_dir, load_config
from fisherdist.data.jsonl import write_jsonl
from tests.distributed import run_distributed

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "agl" / "tiny.yaml"
SUBSETS = {"train": ("drift_train", 10), "task_eval": ("drift_eval", 3), "unsafe": ("unsafe_prompts", 4),
           "safe": ("safe_prompts", 3), "heldout": ("general_heldout", 2)}
TERMS = ("nll", "agl_loss", "agl_fisher", "agl_curvature", "agl_overlap", "agl_separation")


def _overrides(tmp: Path, out: Path, backend: str) -> list[str]:
    files = {}
    for key, (stem, n) in SUBSETS.items():
        src = default_world_dir() / "data" / f"{stem}.jsonl"
        files[key] = tmp / f"{stem}.jsonl"
        if not files[key].is_file():
            write_jsonl(files[key], [json.loads(line) for line in src.read_text().splitlines()[:n]])
    sharded = ["model.load=sharded", "dist.nproc=2", "train.batch_size=2"] if backend != "none" else ["train.batch_size=4"]
    # 10 records, global batch 4: a ragged last step; lr high enough that every factor moves visibly
    return [f"data.{k}={v}" for k, v in files.items()] + [
        f"data.alignment=[{files['unsafe']}]", "train.arms=[agl]", "train.epochs=1",
        "train.lr=0.05", "train.curve_every=2", "fisher.subspace=4", "fisher.batch_size=4", "model.dtype=float64",
        f"dist.backend={backend}", *sharded, f"out={out}"]


def _adapter_values(wrapped: Any) -> dict[str, torch.Tensor]:
    from fisherdist.models.lora_base import lora_tensors

    return lora_tensors(wrapped.unwrapped, lambda fqn: ".lora_" in fqn or ".agl." in fqn)


def _ranks(rank: int, world: int, overrides: list[str], zero3: list[str]) -> dict[str, torch.Tensor]:
    """The fisher stage (its own output), then train and eval (from the single run's bases) on the
    FSDP2-sharded model, then (``zero3``) the train stage on ZeRO-3 partitions; returns
    the adapter as the FSDP2 sharded load initialises it."""
    from fisherdist.methods.agl import run_arm, stages
    from fisherdist.methods.agl.config import AglConfig
    from fisherdist.models.sharded_load import load_wrapped
    from fisherdist.recipes.stages import open_run

    fisher_out = Path(overrides[-1].removeprefix("out=")).parent / "fisher_sharded"
    stages.fisher(open_run(load_config(AglConfig, CONFIG, [*overrides, f"out={fisher_out}", "train.arms=[ewc,agl]"]), ""))
    r = open_run(load_config(AglConfig, CONFIG, overrides), "")
    w = load_wrapped(r.cfg.model.path, r.dtype, "fsdp2", "cpu", load="sharded", prepare=run_arm._prepare(r, "agl"),
                     seed=r.cfg.train.seed)
    assert all(p.to_local().numel() < p.numel() for n, p in w.unwrapped.named_parameters() if ".agl.a" in n)
    initial = _adapter_values(w)
    stages.train(r)
    stages.evaluate(r)
    stages.train(open_run(load_config(AglConfig, CONFIG, zero3), ""))
    return initial


def _merged(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, torch.Tensor]]]:
    """The single-process runs (``agl run`` of the agl arm, ``agl fisher`` with EWC), then one 2-rank launch
    (see ``_ranks``); train and eval there start from the single run's ``fisher/``."""
    tmp = tmp_path_factory.mktemp("agl_scale")
    single, sharded = tmp / "single", tmp / "sharded"
    assert cli.main(["agl", "run", str(CONFIG), *_overrides(tmp, single, "none")]) == 0
    assert cli.main(["agl", "fisher", str(CONFIG), *_overrides(tmp, tmp / "single_ewc", "none"), "train.arms=[ewc]"]) == 0
    for run in (sharded, tmp / "zero3"):
        shutil.copytree(single / "fisher", run / "fisher")
    zero3 = [*_overrides(tmp, tmp / "zero3", "zero3"), "model.dtype=float32"]
    initial = run_distributed(_ranks, 2, _overrides(tmp, sharded, "fsdp2"), zero3, timeout=300)
    return single, sharded, initial


def test_sharded_load_initialises_the_alignment_adapter_as_the_full_load(runs: Any) -> None:
    """C, A_a (name-seeded), B and A as the 2 FSDP2 ranks' sharded load gave them == the whole-model load's."""
    from fisherdist.methods.agl import run_arm
    from fisherdist.methods.agl.config import AglConfig
    from fisherdist.models.sharded_load import load_wrapped
    from fisherdist.recipes.stages import open_run

    single, _, initial = runs
    probe = single.parent / "probe"
    shutil.copytree(single / "fisher", probe / "fisher")
    r = open_run(load_config(AglConfig, CONFIG, _overrides(single.parent, probe, "none")), "")
    w = load_wrapped(r.cfg.model.path, r.dtype, "none", "cpu", prepare=run_arm._prepare(r, "agl"), seed=r.cfg.train.seed)
    want = _adapter_values(w)
    assert len(want) == 16 * 4 and sum(".agl." in n for n in want) == 32  # q, k, v, o of 4 layers: B, A, C, A_a
    for got in initial:
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert torch.equal(got[name], value), name
    assert all(float(v.abs().max()) > 0 for n, v in want.items() if n.endswith(".agl.a"))


def test_sharded_fisher_stage_gives_the_single_process_bases(runs: Any) -> None:
    """Per-module alignment bases from the row-sharded model: the same eigenvalues and eigenvectors (up to
    sign) as from the whole model."""
    from safetensors.torch import load_file

    from fisherdist.methods.agl.stages import BASIS_PARTS

    single, _, _ = runs
    want = load_file(str(single / "fisher" / "bases.safetensors"))
    got = load_file(str(single.parent / "fisher_sharded" / "fisher" / "bases.safetensors"))
    assert got.keys() == want.keys() and len(want) == 16 * len(BASIS_PARTS)
    for name, value in want.items():
        if name.endswith("vectors"):
            torch.testing.assert_close((got[name] * value).sum(0).abs(), torch.ones(value.shape[1], dtype=value.dtype),
                                       rtol=0, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-9, msg=name)


def test_streamed_ewc_diagonal_equals_the_single_process_one(runs: Any) -> None:
    """The EWC diagonal written one module at a time (shards + index) from the sharded fisher stage is the
    single-process one, mean-normalised over all entries."""
    single, _, _ = runs
    want = _merged(single.parent / "single_ewc" / "fisher" / "ewc")
    got = _merged(single.parent / "fisher_sharded" / "fisher" / "ewc")
    assert got.keys() == want.keys() and len(want) == 16
    index = json.loads((single.parent / "single_ewc" / "fisher" / "ewc" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["mean"] > 0 and "per sample" in index["metadata"]["estimator"]
    total = sum(float(v.double().sum()) for v in want.values())
    assert total / sum(v.numel() for v in want.values()) == pytest.approx(1.0, rel=1e-6)
    for name, value in want.items():
        assert value.shape == (192, 192) or value.shape[1] == 192
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_sharded_run_logs_the_single_process_losses(runs: Any) -> None:
    single, sharded, _ = runs
    want = json.loads((single / "train_log_agl.json").read_text())
    got = json.loads((sharded / "train_log_agl.json").read_text())
    assert len(want) == 3 and want[-1]["agl_loss"] > 0
    for g, w in zip(got, want, strict=True):
        for key in TERMS:
            assert g[key] == pytest.approx(w[key], rel=1e-9, abs=1e-12), (g["step"], key)


def test_zero3_sharded_run_agrees_in_float32(runs: Any) -> None:
    """ZeRO-3 with partitioned loading (float32: DeepSpeed partitions no float64) logs the float64 run's
    losses and exports its merged weights, to float32 round-off (which AdamW's 1/sqrt(v) amplifies in small
    gradient elements: 3e-5 seen on updates of ~0.2)."""
    single, _, _ = runs
    zero3 = single.parent / "zero3"
    for g, w in zip(json.loads((zero3 / "train_log_agl.json").read_text()),
                    json.loads((single / "train_log_agl.json").read_text()), strict=True):
        for key in TERMS:
            assert g[key] == pytest.approx(w[key], rel=2e-4, abs=1e-7), (g["step"], key)
    got, want = _merged(zero3 / "models" / "agl"), _merged(single / "models" / "agl")
    assert got.keys() == want.keys() and all(v.dtype == torch.float32 for v in got.values())
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, rtol=0, atol=1e-4, msg=name)


def test_streamed_export_equals_the_single_process_export(runs: Any) -> None:
    from safetensors.torch import load_file

    single, sharded, _ = runs
    want, got = _merged(single / "models" / "agl"), _merged(sharded / "models" / "agl")
    assert got.keys() == want.keys() and not any(".agl." in k or "lora" in k for k in got)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-13, msg=name)
    base = load_file(str(default_world_dir() / "model" / "model.safetensors"))
    moved = [k for k in got if not torch.equal(got[k].float(), base[k])]
    assert len(moved) == 16 and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                                    for k in moved)


def test_merged_export_computes_the_adapted_model(tmp_path: Path) -> None:
    """Logits of the merged directory == logits of the adapted model it came from (W + dW_A + dW_T, both
    adapters live: PEFT's LoRA and the alignment adapter's forward hook), away from B = 0, C = 0."""
    from transformers import AutoModelForCausalLM

    from fisherdist.methods.agl.adapters import merged_delta
    from fisherdist.models.lora_base import export_base
    from tests.test_agl_hooks import _model
    from tests.tiny_hf import build_model_dir

    model = _model().eval()
    export_base(model, build_model_dir(tmp_path), tmp_path / "merged", merge=True, shard_bytes=20_000,
                extra=merged_delta())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64,  # (eager softmax: fp32)
                                                  attn_implementation=model.config._attn_implementation).eval()
    ids = torch.tensor([[1, 17, 5, 40, 8, 9, 2, 33]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-10, atol=1e-10)
        with model.disable_adapter():  # (disable_adapter leaves the forward hook on: drop dW_A by hand)
            base = model(input_ids=ids).logits
    assert float((want - base).abs().max()) > 1e-3  # the adapters change the output: the check is not vacuous


def test_bf16_merged_export_rounds_once(tmp_path: Path) -> None:
    """In bf16 (the 70B recipes), W + s B A + dW_A is formed wide and rounded to bf16 once: the export is
    the float64 sum of the bf16 tensors rounded to bf16 (rare double-rounding ties aside)."""
    from fisherdist.methods.agl.adapters import merged_delta
    from fisherdist.models.lora_base import export_base
    from fisherdist.models.peft_utils import adapted_modules
    from fisherdist.models.sharded_load import checkpoint_name
    from tests.test_agl_hooks import SCALE, _model
    from tests.tiny_hf import build_model_dir

    model = _model().to(torch.bfloat16)
    export_base(model, build_model_dir(tmp_path), tmp_path / "merged", merge=True, extra=merged_delta())
    got = _merged(tmp_path / "merged")
    mismatched = total = 0
    for m in adapted_modules(model):
        agl, d = m.module.agl, lambda t: t.detach().double()
        want = (d(m.module.base_layer.weight) + SCALE * d(m.lora_b) @ d(m.lora_a)
                + SCALE * d(agl.u) @ (d(agl.c) @ d(agl.a))).to(torch.bfloat16)
        out = got[checkpoint_name(m.base_weight_fqn)]
        assert out.dtype == torch.bfloat16
        mismatched, total = mismatched + int((out != want).sum()), total + want.numel()
    assert mismatched / total < 1e-3, (mismatched, total)


def test_sharded_eval_equals_whole_model_eval(runs: Any) -> None:
    single, sharded, _ = runs
    want = json.loads((single / "drift_report.json").read_text())
    got = json.loads((sharded / "drift_report.json").read_text())
    assert got["before"]["unsafe_refusal"] == 1.0
    for part in ("before", "after"):
        flat_w = want[part] if part == "before" else want[part]["agl"]
        flat_g = got[part] if part == "before" else got[part]["agl"]
        for key, value in flat_w.items():
            assert flat_g[key] == pytest.approx(value, rel=1e-9), (part, key)
    assert got["forgetting_curve"] == want["forgetting_curve"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs" / "agl").glob("llama-*.yaml")))
def test_real_scale_recipes_parse(recipe: str) -> None:
    """The 7B / 13B / 70B recipes are valid AglConfigs once model and data point at files that exist; the 70B
    ones load sharded on a backend that can."""
    world = default_world_dir() / "data"
    files = {"train": "drift_train", "task_eval": "drift_eval", "unsafe": "unsafe_prompts", "safe": "safe_prompts",
             "heldout": "general_heldout"}
    from fisherdist.methods.agl.config import AglConfig

    cfg = load_config(AglConfig, CONFIG.parent / recipe, ["model.path=@world/model", f"data.alignment=[{world / 'unsafe_prompts.jsonl'}]",
                                                          *(f"data.{k}={world / v}.jsonl" for k, v in files.items())])
    assert cfg.fisher.subspace == 128 and "agl" in cfg.train.arms
    assert (cfg.model.load, cfg.dist.backend in ("fsdp2", "zero3")) == (("sharded", True) if "70b" in recipe else ("full", False))


@pytest.mark.parametrize("arms, says", [("[lora,agl]", "bases.safetensors"), ("[ewc]", "ewc/model.safetensors.index.json")])
def test_train_without_the_fisher_stage_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, arms: str,
                                                    says: str) -> None:
    assert cli.main(["agl", "train", str(CONFIG), f"train.arms={arms}", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "agl fisher" in err[0]
    assert not (tmp_path / "models").exists() and not (tmp_path / "checkpoints").exists()
