"""``fisherdist sft configs/sft/tiny.yaml`` end to end on the shipped world (the README's "Adding a method"
example): the first step's loss against a float64 response-only NLL computed here from the base model, the
same run on 2 FSDP2 ranks gives the same losses, and the merged export is W + s*B*A of the saved adapter."""

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
    models = tmp_path / "one" / "models"
    adapter = load_file(str(models / "adapter" / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(default_world_dir() / "model", dtype=torch.float64).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(models / "merged", dtype=torch.float64).state_dict()
    name = "model.layers.0.self_attn.q_proj"
    a, b = (adapter[f"base_model.model.{name}.lora_{x}.weight"].double() for x in "AB")
    torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + 2.0 * (b @ a), rtol=1e-5, atol=1e-6)


def _step_oracle(records: list[dict[str, str]], seed: int) -> float:
    """The records of step 1: the first 4 of the epoch's seeded permutation (the recipe's documented order)."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return _oracle_nll([records[i] for i in order[:4]])


def test_sft_config_adds_only_its_sections() -> None:
    from fisherdist.config import load_config
    from fisherdist.errors import ConfigError
    from fisherdist.methods.sft import SftConfig
    from fisherdist.recipes.config import LoraRunConfig

    assert set(SftConfig.model_fields) - set(LoraRunConfig.model_fields) == {"data", "train"}
    tiny = REPO / "configs" / "sft" / "tiny.yaml"
    assert load_config(SftConfig, tiny, ["dist.backend=fsdp2"]).lora.r == 8  # the shared sections parse
    with pytest.raises(ConfigError, match=r"key 'train.beta': unknown key"):  # SUV's DPO key is not SFT's
        load_config(SftConfig, tiny, ["train.beta=0.1"])
    with pytest.raises(ConfigError, match="deepspeed: given, but dist.backend=none"):  # the base's own check
        load_config(SftConfig, tiny, ["deepspeed.zero_optimization.stage=3"])
