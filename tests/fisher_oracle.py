"""An independent float64 oracle for the Fisher engine: one backward per example, no hooks, no sharding."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from fisherdist.fisher.loss import per_sample_nll

SEQ, VOCAB = 12, 64


def model_dtype(backend: str) -> torch.dtype:
    """float64 models everywhere but ZeRO-3: DeepSpeed's ``zero.Init`` partitions only fp16/bf16/fp32
    parameters (it asserts on float64 where the CPU reports fp16 support, and fisherdist refuses it up front)."""
    return torch.float32 if backend == "zero3" else torch.float64


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(dtype)


def dataset(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels with ragged lengths (right padding labelled -100) and an unlabelled prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = ids.clone()
    for i in range(n):
        length = SEQ - (i % 4)
        labels[i, length:] = -100
        labels[i, : 1 + i % 3] = -100
    return ids, labels


def micro_batches(n: int, world: int, mb: int) -> list[list[list[int]]]:
    """``steps[s][r]`` = sample indices rank r uses at step s (the same split the engine tests use)."""
    steps = n // (world * mb)
    return [[list(range((s * world + r) * mb, (s * world + r + 1) * mb)) for r in range(world)] for s in range(steps)]


def sample_grads(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, names: list[str]) -> list[dict[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    for n in names:  # the oracle's own copy: frozen PEFT base weights need gradients here
        params[n].requires_grad_(True)
    out = []
    for i in range(ids.shape[0]):
        loss = per_sample_nll(model(input_ids=ids[i : i + 1]).logits, labels[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        out.append({n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads)})
    return out


def oracle(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, names: list[str], granularity: str,
           estimator: str, world: int, mb: int, token_weighted: bool = False) -> dict[str, torch.Tensor]:
    """The mean-convention Fisher the engine must reproduce."""
    per = sample_grads(model, ids, labels, names)
    tokens = (labels[:, 1:] != -100).sum(1).double()
    units: list[tuple[float, dict[str, torch.Tensor]]] = []  # (weight, gradient)
    steps = micro_batches(ids.shape[0], world, mb)
    if granularity == "sample":
        for i, g in enumerate(per):
            units.append((float(tokens[i]) if token_weighted else 1.0, g))
    elif granularity == "microbatch":
        for step in steps:
            for idx in step:
                if token_weighted:  # gradient of the token-mean NLL of the micro-batch
                    w = tokens[idx]
                    g = {n: sum(per[i][n] * tokens[i] for i in idx) / w.sum() for n in names}
                    units.append((float(w.sum()), g))
                else:
                    units.append((1.0, {n: sum(per[i][n] for i in idx) / len(idx) for n in names}))
    else:  # batch: the gradient averaged over ranks, once per step
        for step in steps:
            flat = [i for idx in step for i in idx]
            units.append((1.0, {n: sum(per[i][n] for i in flat) / len(flat) for n in names}))
    total = sum(w for w, _ in units)
    result = {}
    for n in names:
        sq = sum(w * g[n] ** 2 for w, g in units) / total
        first = sum(w * g[n] for w, g in units) / total
        result[n] = {"empirical": sq, "centered": (sq - first**2).clamp_min(0), "rank1": first}[estimator]
    return result
