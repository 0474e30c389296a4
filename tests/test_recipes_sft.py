"""The one SFT recipe. ``fisherdist sft configs/sft/tiny.yaml`` end to end on the shipped world (the README's
"Adding a method" example): the first step's loss against a float64 response-only NLL computed here from the
base model, the same run on 2 FSDP2 ranks gives the same losses, and the merged export is W + s*B*A of the
saved adapter. ``run_sft`` with Natural GaLore, preempted and resumed, ends like an uninterrupted run;
``fisherdist finetune`` on 2 FSDP2 ranks equals 1 process; ``fisherdist pretrain`` starts from seeded random
weights (first loss against a float64 plain-text NLL computed here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fisherdist import cli
from fisherdist.config import default_world_dir
from fisherdist.data.jsonl import read_records

REPO = Path(__file__).resolve().parent.parent
ARGS = ["data.num_samples=6", "train.batch_size=4", "train.epochs=3", "model.dtype=float64"]  # 2 steps an epoch, the last uneven


def _oracle_nll(records: list[dict[str, str]]) -> float:
    """Token-mean NLL of the answers given BOS + question, float64, scored position by position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_world_dir() / "model"
    model, tok = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64), AutoTokenizer.from_pretrained(path)
    total, count = 0.0, 0
    for r in records:
        q = tok(r["question"], add_special_tokens=False)["input_ids"]
        a = tok(r["question"] + r["answer"], add_special_tokens=False)["input_ids"][len(q):]
        ids = [tok.bos_token_id, *q, *a]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        for t in range(len(ids) - len(a), len(ids)):
            total -= float(logp[t - 1, ids[t]])
            count += 1
    return total / count


def _run(out: Path, *extra: str) -> list[dict[str, float]]:
    assert cli.main(["sft", str(REPO / "configs" / "sft" / "tiny.yaml"), f"out={out}", *ARGS, *extra]) == 0
    return json.loads((out / "train_log.json").read_text())


def test_sft_recipe_end_to_end(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    one = _run(tmp_path / "one")
    assert len(one) == 6 and one[-1]["nll"] < one[0]["nll"]
    first_epoch = read_records(default_world_dir() / "data" / "authors_retain.jsonl", ["question", "answer"])[:6]
    # step 1 and step 2 together cover the epoch; B = 0 at step 1, so its loss is the base model's on its 4 records
    assert one[0]["nll"] == pytest.approx(_step_oracle(first_epoch, seed=0), rel=1e-9)
    two = _run(tmp_path / "two", "dist.backend=fsdp2", "dist.nproc=2", "train.batch_size=2")
    assert [r["nll"] for r in two] == pytest.approx([r["nll"] for r in one], rel=1e-7)
    _check_metrics(tmp_path / "one", tmp_path / "two", one, first_epoch)
    models = tmp_path / "one" / "models"
    adapter = load_file(str(models / "adapter" / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(default_world_dir() / "model", dtype=torch.float64).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(models / "merged", dtype=torch.float64).state_dict()
    name = "model.layers.0.self_attn.q_proj"
    a, b = (adapter[f"base_model.model.{name}.lora_{x}.weight"].double() for x in "AB")
    torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + 2.0 * (b @ a), rtol=1e-5, atol=1e-6)


def _metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_metrics(one_dir: Path, two_dir: Path, one: list[dict], records: list[dict[str, str]]) -> None:
    """metrics.jsonl: one row per step with the loss, lr, gradient norm, counts and rates; the values are the
    run's (2 FSDP2 ranks log what 1 process logs), tokens = every record's length once per epoch."""
    from transformers import AutoTokenizer

    rows, rows2 = _metrics(one_dir), _metrics(two_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in rows2] == list(range(1, 7))
    assert all(r["stage"] == "train" and r["lr"] == 1e-3 for r in rows + rows2)
    assert [r["nll"] for r in rows] == [r["nll"] for r in one]
    assert [r["samples"] for r in rows] == [r["samples"] for r in rows2] == [4, 2] * 3
    assert [r["grad_norm"] for r in rows2] == pytest.approx([r["grad_norm"] for r in rows], rel=1e-7)
    assert all(r["grad_norm"] > 0 for r in rows) and all(r["tokens_per_s"] > 0 for r in rows[1:] + rows2[1:])
    tok = AutoTokenizer.from_pretrained(default_world_dir() / "model")
    lengths = [min(64, 1 + len(tok(r["question"] + r["answer"], add_special_tokens=False)["input_ids"])) for r in records]
    assert [r["tokens"] for r in rows2] == [r["tokens"] for r in rows]
    assert sum(r["tokens"] for r in rows) == 3 * sum(lengths)


def _step_oracle(records: list[dict[str, str]], seed: int) -> float:
    """The records of step 1: the first 4 of the epoch's seeded permutation (the recipe's documented order)."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return _oracle_nll([records[i] for i in order[:4]])


def test_sft_config_adds_only_its_sections() -> None:
    from fisherdist.config import load_config
    from fisherdist.errors import ConfigError
    from fisherdist.methods.sft import SftConfig
    from fisherdist.recipes.config import LoraRunConfig

    assert set(SftConfig.model_fields) - set(LoraRunConfig.model_fields) == {"data", "train", "optim", "init"}
    tiny = REPO / "configs" / "sft" / "tiny.yaml"
    assert load_config(SftConfig, tiny, ["dist.backend=fsdp2"]).lora.r == 8  # the shared sections parse
    with pytest.raises(ConfigError, match=r"key 'train.beta': unknown key"):  # SUV's DPO key is not SFT's
        load_config(SftConfig, tiny, ["train.beta=0.1"])
    with pytest.raises(ConfigError, match="deepspeed: given, but dist.backend=none"):  # the base's own check
        load_config(SftConfig, tiny, ["deepspeed.zero_optimization.stage=3"])


def _plain_nll(model: torch.nn.Module, tok: object, texts: list[str], max_length: int) -> float:
    """Token-mean NLL of BOS + text (truncated to ``max_length`` tokens in all), float64, position by position."""
    total, count = 0.0, 0
    for text in texts:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]][:max_length]  # type: ignore[attr-defined]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        total -= sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
        count += len(ids) - 1
    return total / count


def _finetune(ckpt: Path, stop_at: int = -1) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """run_sft (the callable recipe) with Natural GaLore on every weight, float64, 6 steps."""
    from transformers import AutoTokenizer

    from fisherdist.methods.sft import SftTrain, load_prompted, run_sft
    from fisherdist.models.sharded_load import load_wrapped
    from fisherdist.recipes.optimizers import OptimizerSettings, optimizer_factory
    from tests.test_trainer import StopAt

    path = default_world_dir() / "model"
    tok = AutoTokenizer.from_pretrained(path)
    records = load_prompted(default_world_dir() / "data" / "task_train.jsonl", tok, "prompt", "response", 24)
    t = SftTrain(batch_size=4, max_length=32, checkpoint_every=None, checkpoint_minutes=None)
    held: dict[str, torch.nn.Module] = {}
    galore = OptimizerSettings(name="natural_galore", rank=8, update_proj_gap=2, history=2)
    opt = optimizer_factory(galore, t.lr, 0.0, lambda: held["model"])
    w = load_wrapped(path, torch.float64, "none", "cpu", prepare=lambda m: held.setdefault("model", m), optimizer_factory=opt)
    history = run_sft(w, records, t, int(tok.pad_token_id), checkpoint_dir=ckpt, hooks=[StopAt(stop_at)], progress=False)
    return history, {n: p.detach().clone() for n, p in held["model"].named_parameters()}


def test_run_sft_natural_galore_preempted_and_resumed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fisherdist.recipes.trainer import TrainingPreempted

    ref_log, ref_weights = _finetune(tmp_path / "ref")
    with pytest.raises(TrainingPreempted):
        _finetune(tmp_path / "ckpt", stop_at=3)  # mid-subspace: the projector was refreshed at step 3
    capsys.readouterr()
    log, weights = _finetune(tmp_path / "ckpt")
    assert capsys.readouterr().out.startswith("train: resuming from step 3 of 6")
    assert [r["records"] for r in log] == [r["records"] for r in ref_log]
    assert [r["nll"] for r in log] == pytest.approx([r["nll"] for r in ref_log], rel=1e-10)
    for name, want in ref_weights.items():
        torch.testing.assert_close(weights[name], want, rtol=1e-10, atol=1e-12, msg=name)
    assert not (tmp_path / "ckpt").exists()  # a finished run drops its checkpoints


FINETUNE = ["data.num_samples=8", "train.batch_size=4", "train.max_length=32", "optim.rank=8", "model.dtype=float64"]


def test_finetune_command_two_ranks_equal_one(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = str(REPO / "configs" / "finetune" / "tiny.yaml")
    assert cli.main(["finetune", cfg, f"out={tmp_path / 'one'}", *FINETUNE]) == 0
    assert cli.main(["finetune", cfg, f"out={tmp_path / 'two'}", *FINETUNE, "dist.backend=fsdp2", "dist.nproc=2",
                     "train.batch_size=2"]) == 0
    logs = [json.loads((tmp_path / r / "train_log.json").read_text()) for r in ("one", "two")]
    assert len(logs[0]) == 2 and [r["nll"] for r in logs[1]] == pytest.approx([r["nll"] for r in logs[0]], rel=1e-7)
    one, two = (load_file(str(tmp_path / r / "models" / "trained" / "model-00001.safetensors")) for r in ("one", "two"))
    base = load_file(str(default_world_dir() / "model" / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert (one[key].double() - base[key].double()).abs().max() > 1e-6  # every weight trained
    for name, t in one.items():
        torch.testing.assert_close(two[name], t, rtol=1e-6, atol=1e-9, msg=name)


def test_pretrain_command_from_random_weights(tmp_path: Path) -> None:
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = ["data.num_samples=8", "train.batch_size=4", "train.max_length=24", "optim.rank=8", "model.dtype=float64",
            "data.pack=false"]  # one record a sample (tests/test_data_packing.py covers packing)
    assert cli.main(["pretrain", str(REPO / "configs" / "pretrain" / "tiny.yaml"), f"out={tmp_path}", *args]) == 0
    log = json.loads((tmp_path / "train_log.json").read_text())
    path = default_world_dir() / "model"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)  # train.seed: the documented random initialisation, done here again
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.02 if p.ndim == 2 else torch.ones_like(p))
    texts = [r["text"] for r in read_records(default_world_dir() / "data" / "general_train.jsonl", ["text"])[:8]]
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    want = _plain_nll(model, AutoTokenizer.from_pretrained(path), [texts[i] for i in order[:4]], 24)
    assert log[0]["nll"] == pytest.approx(want, rel=1e-9)
    assert abs(log[0]["nll"] - math.log(model.config.vocab_size)) < 1.0  # random weights: about uniform
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "trained", dtype=torch.float64)
    assert len(log) == 2 and trained.config.vocab_size == model.config.vocab_size


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in REPO.glob("configs/*/llama-*.yaml")
                                          if p.parent.name in ("finetune", "pretrain")))
def test_real_scale_recipes_parse(recipe: str) -> None:
    """The 1B / 7B recipes are valid SftConfigs once model and data point at files that exist."""
    from fisherdist.config import load_config
    from fisherdist.methods.sft import SftConfig

    cfg = load_config(SftConfig, REPO / recipe, ["model.path=@world/model", "data.train=@world/data/task_train.jsonl"])
    assert cfg.lora is None and cfg.dist.backend == "fsdp2" and cfg.optim.name == "natural_galore"
