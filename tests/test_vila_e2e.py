"""The one shortened end-to-end run of ``fisherdist vila run`` on the shipped tiny world (a few authors, a
few steps): every output exists, the PEFT adapter on the rewritten base equals the merged model, and the
forget answers became less likely while the report records it. The quality targets live in bench/vila.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fisherdist.cli import main
from fisherdist.config import default_world_dir
from fisherdist.data.jsonl import read_jsonl, write_jsonl

TINY = Path(__file__).resolve().parents[1] / "configs" / "vila" / "tiny.yaml"


def test_vila_run_end_to_end(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = default_world_dir() / "data"
    write_jsonl(tmp_path / "forget.jsonl", read_jsonl(data / "authors_forget.jsonl")[:8])
    write_jsonl(tmp_path / "retain.jsonl", read_jsonl(data / "authors_retain.jsonl")[:8])
    out = tmp_path / "run"
    rc = main(["vila", "run", str(TINY), f"out={out}", f"data.forget={tmp_path / 'forget.jsonl'}",
               f"data.retain={tmp_path / 'retain.jsonl'}", "data.heldout=null", "data.task=null",
               "train.max_steps=6", "train.loss=gd", "train.retain_weight=1", "train.lr=3e-3", "eval.tofu.max_new_tokens=6"])
    assert rc == 0
    for rel in ("models/adapter/adapter_config.json", "models/base/config.json", "models/unlearned/config.json",
                "report.png", "importance/rows.pt", "init/factors.pt"):
        assert (out / rel).is_file(), rel
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    unlearned = AutoModelForCausalLM.from_pretrained(out / "models" / "unlearned", dtype=torch.float64)
    base = AutoModelForCausalLM.from_pretrained(out / "models" / "base", dtype=torch.float64)
    adapted = PeftModel.from_pretrained(base, out / "models" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, unlearned(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["forget"]["probability"] < report["before"]["forget"]["probability"]
    assert report["summary"]["forget_accuracy"][1] <= report["summary"]["forget_accuracy"][0]
