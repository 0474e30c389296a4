"""LQ-LoRA fine-tuning and export on the shared recipes layer.

``train``: the base model's decomposed Linear layers become packed :class:`~fisherdist.models.qlinear.QLinear`
layers (Q frozen, outside every wrapper's parameters), under a LoRA adapter set to A = L2/sqrt(s),
B = L1/sqrt(s) (s = alpha / r), so the model starts equal to Q + L1 L2; only A, B train, with the token-mean
NLL of ``data.train`` through the SFT recipe's :func:`~fisherdist.methods.sft.run_sft` (no prompt: every token
scored; any backend, resume, preemption). Each rank's loss is its summed NLL x W / the step's global token count, so the backend's
gradient average is the gradient of the global token mean whatever the world size.
``export``: dense Q + s B A as a HF directory, the measured bits and held-out perplexities.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fisherdist.distributed.collectives import barrier
from fisherdist.errors import ConfigError
from fisherdist.methods.lqlora.config import LqloraConfig
from fisherdist.methods.sft import run_sft
from fisherdist.models.peft_utils import LoraSettings
from fisherdist.models.quant import QuantizedTensor
from fisherdist.recipes.stages import RunContext

Ctx = RunContext[LqloraConfig]


def quantized_lora(base: nn.Module, lora: LoraSettings, packed: Mapping[str, QuantizedTensor]) -> nn.Module:
    """``base`` + LoRA with every decomposed matrix's base layer packed; a mismatch between the decomposed
    matrices and ``lora.targets`` is an error (an unquantized adapted layer would fake the bit count)."""
    from fisherdist.models.peft_utils import adapted_modules, apply_lora
    from fisherdist.models.qlinear import quantize_base_layers
    from fisherdist.models.sharded_load import checkpoint_name

    model = apply_lora(base, lora)
    done = set(quantize_base_layers(model, packed))
    adapted = {checkpoint_name(m.base_weight_fqn) for m in adapted_modules(model)}
    if done != set(packed) or adapted != done:
        odd = sorted((set(packed) ^ done) | (adapted - done))
        raise ConfigError(f"lora.targets={lora.targets} and decompose.targets must cover the same matrices; "
                          f"differing: {odd[:3]}")
    return model


def lqlora_factors(model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A = L2 / sqrt(s), B = L1 / sqrt(s) for every adapted module, so s B A = L1 L2 (any sharding)."""
    from fisherdist.models.lora_base import scaling, set_factors
    from fisherdist.models.sharded_load import checkpoint_name

    def ab(m: Any) -> tuple[torch.Tensor, torch.Tensor]:
        l1, l2 = factors[checkpoint_name(m.base_weight_fqn)]
        root = scaling(m) ** 0.5
        return l2.double() / root, l1.double() / root  # float64: s B A = L1 L2 to rounding of the model dtype

    set_factors(model, ab)


def load_training_model(r: Ctx) -> tuple[Any, dict[str, QuantizedTensor]]:
    """The wrapped packed-Q + LoRA model with its optimizer, and the packed weights."""
    from fisherdist.methods.lqlora.export import Decomposition
    from fisherdist.models.sharded_load import load_wrapped

    dec = Decomposition(r.out / "decomposition")
    if dec.rank != r.cfg.lora.r:
        raise ConfigError(f"lora.r={r.cfg.lora.r}, but {dec.folder} was decomposed at rank {dec.rank}")
    packed = {n: dec.packed(n) for n in dec.matrices}
    factors = {n: dec.factors(n) for n in dec.matrices}
    t, m = r.cfg.train, r.cfg.model
    w = load_wrapped(m.path, r.dtype, r.cfg.dist.backend, r.env.device, load=m.load, seed=t.seed,
                     prepare=lambda base: quantized_lora(base, r.cfg.lora, packed),
                     lora_init=lambda model: lqlora_factors(model, factors),
                     optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=t.lr, weight_decay=t.weight_decay),
                     **r.cfg.backend_options(t.batch_size, t.max_grad_norm))
    return w, packed


def _train_tokens(r: Ctx) -> list[list[int]]:
    from fisherdist.data.batches import load_texts, tokenize

    d, t = r.cfg.data, r.cfg.train
    return [x for x in tokenize(load_texts(d.train, d.text_field, t.num_samples), r.tokenizer, t.max_length) if len(x) >= 2]


def train(r: Ctx) -> None:
    """Fine-tune L1 L2 with Q frozen (packed) -> ``models/lqlora/`` (packed Q + LoRA), ``train_log.json``."""
    from fisherdist.methods.lqlora.export import plain_tensors
    from fisherdist.models.quant_lora import save_quantized_lora

    w, packed = load_training_model(r)
    history = run_sft(w, [([], seq) for seq in _train_tokens(r)], r.cfg.train, r.pad_id,
                      checkpoint_dir=r.out / "checkpoints" / "train", metrics=r.metrics)
    lora = w.gather_trainable()
    if r.rank == 0:
        (r.out / "train_log.json").write_text(json.dumps(history, indent=1))
        save_quantized_lora(r.out / "models" / "lqlora", r.cfg.model.path, plain_tensors(r.cfg.model.path, packed),
                            packed, lora, r.cfg.lora)
    barrier()
    r.log(f"train: nll {history[0]['nll']:.4f} -> {history[-1]['nll']:.4f} over {len(history)} steps")


def _merged_weights(folder: Any) -> Any:
    """name, W -> dequantized Q + s B A for the quantized matrices of a ``models/lqlora`` directory."""
    from safetensors.torch import load_file

    from fisherdist.models.quant_lora import read_meta, read_packed_dir
    from fisherdist.models.sharded_load import PEFT_PREFIX

    packed, lora = read_packed_dir(folder), load_file(str(folder / "lora.safetensors"))
    s = read_meta(folder)["lora"]["alpha"] / read_meta(folder)["lora"]["r"]

    def merged(name: str, w: torch.Tensor) -> torch.Tensor:
        if name not in packed:
            return w
        stem = PEFT_PREFIX + name.removesuffix(".weight")
        a, b = lora[f"{stem}.lora_A.default.weight"].double(), lora[f"{stem}.lora_B.default.weight"].double()
        return packed[name].dequantize(torch.float64) + s * (b @ a)

    return merged, packed


def _perplexity(r: Ctx, path: Any) -> float:
    from fisherdist.data.batches import load_texts
    from fisherdist.eval.utility import perplexity
    from fisherdist.models.sharded_load import load_for_generation

    assert r.cfg.data.heldout is not None
    model = load_for_generation(path, r.dtype, r.env.device, r.cfg.model.load, r.cfg.dist.backend)
    texts = load_texts(r.cfg.data.heldout, r.cfg.data.text_field)
    return float(perplexity(model, r.tokenizer, texts, max_length=r.cfg.train.max_length)["perplexity"])


def export(r: Ctx) -> None:
    """Dense Q + s B A -> ``models/merged/``; measured bits and held-out perplexities -> ``report.json``."""
    from fisherdist.atomic import write_text
    from fisherdist.methods.lqlora.export import bits_report
    from fisherdist.models.export import rewrite_checkpoint

    models = r.out / "models"
    report: dict[str, Any] = {"rank": r.cfg.lora.r, "fisher_weighted": r.cfg.fisher.enabled,
                              "budget": r.cfg.decompose.budget}
    if r.rank == 0:  # the other ranks only join the perplexity runs
        merged, packed = _merged_weights(models / "lqlora")
        rewrite_checkpoint(r.cfg.model.path, models / "merged", merged, r.dtype)
        report.update(bits_report(packed, r.cfg.lora.r))
    barrier()
    if r.cfg.data.heldout is not None:
        report["heldout_perplexity"] = {k: _perplexity(r, p) for k, p in
                                        (("base", r.cfg.model.path), ("decomposed", models / "decomposed"),
                                         ("merged", models / "merged"))}
    if r.rank == 0:
        write_text(r.out / "report.json", json.dumps(report, indent=1) + "\n")
        r.log(f"export: {report['bits_per_param']:.4f} bits/param ({report['bits_per_param_with_lowrank']:.4f} with "
              f"L1 L2), perplexity {report.get('heldout_perplexity')}")
