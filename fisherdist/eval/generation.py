"""Batched continuation of token-id prompts: greedy or seeded temperature sampling, with a KV cache.

Everything that generates (memorisation eval, SUV mining, chosen-continuation sampling, task accuracy)
goes through the :class:`Generate` protocol, so tests can substitute a deterministic oracle. The HF
implementation always runs exactly ``max_new_tokens`` decoding steps per batch (EOS only truncates the
result afterwards): a sharded model then makes the same collective calls on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from fisherdist.distributed import collectives


class Generate(Protocol):
    """``generate(prompts, max_new_tokens, seeds)`` -> one list of new token ids per prompt (at most
    ``max_new_tokens``; prompts are complete model inputs, special tokens included). ``seeds`` gives one
    sampling seed per prompt, so a row's sample does not depend on its batch or on the world size;
    greedy generators ignore it."""

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 seeds: Sequence[int] | None = None) -> list[list[int]]: ...


def _cache_kwargs(out: Any) -> dict[str, Any]:
    """Hand the KV cache back under the name this transformers version uses (``cache`` since 5.x,
    ``past_key_values`` before)."""
    if hasattr(out, "cache"):
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


class HFGenerator:
    """:class:`Generate` for a Hugging Face causal LM (plain, PEFT, or FSDP/DDP-wrapped module).

    ``temperature <= 0`` is greedy (argmax; SUV's temperature 0.01 is the same up to ties). Prompts are
    left-padded with explicit position ids, so a row's result does not depend on its batch neighbours'
    lengths. Sampling draws each row from its own ``torch.Generator`` seeded from ``seeds`` (default: the
    row's index in the call).
    """

    def __init__(self, model: Any, pad_id: int = 0, eos_id: int | None = None, temperature: float = 0.0,
                 batch_size: int = 16, progress: str | None = None) -> None:
        self.model, self.pad_id, self.eos_id = model, pad_id, eos_id
        self.temperature, self.batch_size = temperature, batch_size
        self.progress = progress  # a description shows a rich progress bar over batches (rank 0 only)

    @classmethod
    def for_tokenizer(cls, model: Any, tokenizer: Any, **kwargs: Any) -> HFGenerator:
        """Pad / EOS ids taken from the tokenizer (pad falls back to EOS, then 0)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(model, pad_id=pad if pad is not None else 0, eos_id=tokenizer.eos_token_id, **kwargs)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pick(self, logits: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens)])

    @torch.no_grad()
    def _batch(self, prompts: Sequence[Sequence[int]], n: int, seeds: Sequence[int]) -> list[list[int]]:
        device = self._device()
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds] if self.temperature > 0 else []
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        steps = []
        for step in range(n):
            nxt = self._pick(out.logits[:, -1], gens)
            steps.append(nxt)
            if step == n - 1:
                break
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                             **_cache_kwargs(out))
        rows = torch.stack(steps, dim=1).tolist()
        if self.eos_id is not None:
            rows = [r[: r.index(self.eos_id)] if self.eos_id in r else r for r in rows]
        return rows

    def _starts(self, n: int) -> Iterable[int]:
        starts = range(0, n, self.batch_size)
        rank = collectives.rank()
        if self.progress is None or rank != 0:
            return starts
        from rich.progress import track

        return track(starts, description=self.progress, transient=True)

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 seeds: Sequence[int] | None = None) -> list[list[int]]:
        if max_new_tokens <= 0 or not prompts:
            return [[] for _ in prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("HFGenerator: empty prompt (nothing to condition on)")
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        was_training = self.model.training
        self.model.eval()
        try:
            out: list[list[int]] = []
            for lo in self._starts(len(prompts)):
                hi = lo + self.batch_size
                out += self._batch(prompts[lo:hi], max_new_tokens, seeds[lo:hi])
            return out
        finally:
            self.model.train(was_training)
