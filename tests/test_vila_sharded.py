"""The Fisher-weighted initialisation on 2 gloo ranks (FSDP2 row shards, ZeRO-3 flat partitions): the
model's outputs are unchanged at step 0, and the factors equal a single-process float64 computation
(the randomized SVD made exact with q = every column, so the comparison is against a dense SVD)."""

from __future__ import annotations

import pytest
import torch

from fisherdist.methods.vila import init as vila_init
from fisherdist.models.lora_base import lora_tensors
from fisherdist.models.peft_utils import LoraSettings, adapted_modules, apply_lora
from fisherdist.models.sharded_load import load_wrapped
from tests.distributed import run_distributed
from tests.tiny_hf import build_model_dir

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)  # s = 2
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11]])


def _rows(name: str, d_out: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.rand(d_out, generator=g, dtype=torch.float64) + 0.05


def _hook(model: torch.nn.Module) -> None:
    rows = {m.name: _rows(m.name, m.lora_b.ds_shape[0] if hasattr(m.lora_b, "ds_shape") else m.lora_b.shape[0])
            for m in adapted_modules(model)}
    vila_init.fisher_init(rows)(model)


def _worker(rank: int, world: int, path, backend: str):
    vila_init.OVERSAMPLE = 1000  # exact SVD
    w = load_wrapped(path, torch.float32, backend, "cpu", load="sharded", prepare=lambda m: apply_lora(m, LORA),
                     lora_init=_hook)
    logits = w.module(input_ids=IDS).logits.detach()
    return logits, lora_tensors(w.unwrapped)


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_init_unchanged_outputs_and_factors_on_two_ranks(tmp_path, backend):
    from transformers import AutoModelForCausalLM

    path = build_model_dir(tmp_path)
    results = run_distributed(_worker, 2, path, backend, timeout=420)
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    with torch.no_grad():
        want_logits = original(input_ids=IDS).logits
    ref = apply_lora(original, LORA)
    for logits, factors in results:
        torch.testing.assert_close(logits.double(), want_logits, rtol=1e-4, atol=1e-5)
        for m in adapted_modules(ref):
            rho = _rows(m.name, m.lora_b.shape[0]).sqrt()
            uu, ss, vvt = torch.linalg.svd(rho[:, None] * m.module.base_layer.weight.detach(), full_matrices=False)
            want = (uu[:, :4] * ss[:4] @ vvt[:4]) / (rho[:, None] + vila_init.EPS)
            a, b = factors[f"{m.name}.lora_A.default.weight"], factors[f"{m.name}.lora_B.default.weight"]
            torch.testing.assert_close(2.0 * b.double() @ a.double(), want, rtol=1e-4, atol=1e-5)
