"""An independent float64 oracle for the Fisher engine: one backward per example, no hooks, no sharding,
and no engine code: it computes per-sample losses itself (log-softmax + gather with the causal label
shift), draws the true Fisher's labels itself (the same generator calls as the engine, so a seed reproduces
them) and knows the exact true Fisher on a tiny vocabulary (an expectation over every label)."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

SEQ, VOCAB = 12, 64


def model_dtype(backend: str) -> torch.dtype:
    """float64 models everywhere but ZeRO-3: DeepSpeed's ``zero.Init`` partitions only fp16/bf16/fp32
    parameters (it asserts on float64 where the CPU reports fp16 support, and fisherdist refuses it up front)."""
    return torch.float32 if backend == "zero3" else torch.float64


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(dtype)


def dataset(n: int, seed: int = 1, vocab: int = VOCAB, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels with ragged lengths (right padding labelled -100) and an unlabelled prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = ids.clone()
    for i in range(n):
        length = seq - (i % 4)
        labels[i, length:] = -100
        labels[i, : 1 + i % 3] = -100
    return ids, labels


def micro_batches(n: int, world: int, mb: int) -> list[list[list[int]]]:
    """``steps[s][r]`` = sample indices rank r uses at step s: ``ceil(n / (world*mb))`` steps, so the last
    step may be uneven (short or empty micro-batches; the engine tests top them up, see :func:`padded`)."""
    steps = math.ceil(n / (world * mb))
    return [[[i for i in range((s * world + r) * mb, (s * world + r + 1) * mb) if i < n] for r in range(world)]
            for s in range(steps)]


def padded(idx: list[int], mb: int) -> tuple[list[int], torch.Tensor]:
    """A micro-batch topped up to ``mb`` rows with sample 0 marked invalid (as the data loader does)."""
    return idx + [0] * (mb - len(idx)), torch.tensor([True] * len(idx) + [False] * (mb - len(idx)))


def mean_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean NLL over the tokens that carry a label: the logits at t predict label t+1."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum(1) / keep.sum(1).clamp_min(1)


def draw_labels(logits: torch.Tensor, labels: torch.Tensor, estimator: str, generator: torch.Generator | None) -> torch.Tensor:
    """Data labels, the model's argmax (pseudo) or a draw from it (true), at the positions the data labels."""
    if estimator not in ("true", "pseudo"):
        return labels
    probs = logits[:, :-1].detach().float().softmax(-1)
    if estimator == "pseudo":
        drawn = probs.argmax(-1)
    else:
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
    out = labels.clone()
    out[:, 1:] = torch.where(labels[:, 1:] == -100, labels[:, 1:], drawn)
    return out


def grads_of(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The gradient of one sample's mean-token NLL (``ids``, ``labels``: one row)."""
    params = dict(model.named_parameters())
    for n in names:  # the oracle's own copy: frozen PEFT base weights need gradients here
        params[n].requires_grad_(True)
    loss = mean_token_nll(model(input_ids=ids).logits, labels).sum()
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads)}


def sample_grads(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, names: list[str]) -> list[dict[str, torch.Tensor]]:
    return [grads_of(model, ids[i : i + 1], labels[i : i + 1], names) for i in range(ids.shape[0])]


Unit = tuple[float, dict[str, torch.Tensor]]  # (weight, gradient)


def _combine(ranks: list[list[tuple[int, dict[str, torch.Tensor]]]], tokens: torch.Tensor, names: list[str],
             granularity: str, token_weighted: bool) -> list[Unit]:
    """One step's units: every sample, every non-empty micro-batch, or the step's valid samples."""
    def mean(part: list[tuple[int, dict[str, torch.Tensor]]], w: list[float]) -> dict[str, torch.Tensor]:
        return {n: sum(wi * g[n] for wi, (_, g) in zip(w, part)) / sum(w) for n in names}

    if granularity == "sample":
        return [(float(tokens[i]) if token_weighted else 1.0, g) for part in ranks for i, g in part]
    if granularity == "microbatch":
        out = []
        for part in filter(None, ranks):
            w = [float(tokens[i]) if token_weighted else 1.0 for i, _ in part]
            out.append((sum(w) if token_weighted else 1.0, mean(part, w)))
        return out
    flat = [x for part in ranks for x in part]
    return [(1.0, mean(flat, [1.0] * len(flat)))] if flat else []


def units(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, names: list[str], granularity: str,
          estimator: str, world: int, mb: int, token_weighted: bool = False, mc_samples: int = 1,
          seed: int = 0) -> list[Unit]:
    """Every (weight, gradient) the engine must square, visiting micro-batches in the engine's order (rank
    r draws true-Fisher labels from its own generator seeded ``seed + r``, ``mc_samples`` times each)."""
    gens = [torch.Generator().manual_seed(seed + r) for r in range(world)]
    tokens = (labels[:, 1:] != -100).sum(1).double()
    out: list[Unit] = []
    for step in micro_batches(ids.shape[0], world, mb):
        per_draw: list[list[list[tuple[int, dict[str, torch.Tensor]]]]] = [[] for _ in range(mc_samples)]
        for r, idx in enumerate(step):
            rows, _ = padded(idx, mb)
            for d in range(mc_samples):
                with torch.no_grad():
                    logits = model(input_ids=ids[rows]).logits
                used = draw_labels(logits, labels[rows], estimator, gens[r])
                per_draw[d].append([(i, grads_of(model, ids[i : i + 1], used[k : k + 1], names)) for k, i in enumerate(idx)])
        for ranks in per_draw:
            out += _combine(ranks, tokens, names, granularity, token_weighted)
    return out


def oracle(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, names: list[str], granularity: str,
           estimator: str, world: int, mb: int, token_weighted: bool = False, mc_samples: int = 1,
           seed: int = 0) -> dict[str, torch.Tensor]:
    """The mean-convention Fisher the engine must reproduce."""
    found = units(model, ids, labels, names, granularity, estimator, world, mb, token_weighted, mc_samples, seed)
    total = sum(w for w, _ in found)
    result = {}
    for n in names:
        sq = sum(w * g[n] ** 2 for w, g in found) / total
        first = sum(w * g[n] for w, g in found) / total
        result[n] = {"centered": (sq - first**2).clamp_min(0), "rank1": first}.get(estimator, sq)
    return result


def exact_true_fisher(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The true Fisher at sample granularity as an exact expectation over every label (tiny vocabulary).

    Labels at different positions are drawn independently given the input, and the score has mean zero,
    so ``E[g_i^2] = (1/T_i^2) sum_t sum_v p_t(v) (d(-log p_t(v)))^2``: no cross terms survive.
    """
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(ids.shape[0]):
        logp = torch.log_softmax(model(input_ids=ids[i : i + 1]).logits[0, :-1].double(), -1)
        positions = [t for t in range(logp.shape[0]) if labels[i, t + 1] != -100]
        for t in positions:
            for v in range(logp.shape[1]):
                grads = torch.autograd.grad(-logp[t, v], [params[n] for n in names], retain_graph=True)
                for n, g in zip(names, grads):
                    total[n] += logp[t, v].exp().detach() * g**2 / len(positions) ** 2
    return {n: t / ids.shape[0] for n, t in total.items()}
