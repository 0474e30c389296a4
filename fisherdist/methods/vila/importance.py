"""FILA / VILA parameter importance: forget and retain Fisher from ONE pass (one accumulator, two states),
then the per-row importance of every adapted weight.

FILA: token-weighted per-micro-batch diagonal Fisher of the frozen base weights, F = sum_b c_b g_b^2 /
sum_b c_b (c_b = label tokens of micro-batch b, g_b its mean-token-NLL gradient). VILA: the same on the
LoRA factors A (r x d_in), B (d_out x r), centered (E[g^2] - E[g]^2, clamped at 0), and the full-weight
importance approximated by F_B @ F_A. The engine squares each rank's local micro-batch gradient before any
reduction, so the statistics are exact on every backend.

Relative importance I = F_f / (1e-5 + F_r) with each F in the mean convention, i.e. divided by its token
count ONCE. The official VILA code divides its (already token-normalised) importances by the token counts
a second time at initialisation (FILA's does not); that shrinks F by ~1/c and so changes the effective
1e-5 epsilon. We implement the maths as defined (normalise once), for VILA and FILA alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import zip_longest
from typing import Any, Literal

import torch

from fisherdist.fisher import FisherAccumulator, FisherSpec, per_sample_nll
from fisherdist.fisher.accumulator import label_token_counts
from fisherdist.fisher.summary import summarise
from fisherdist.models.peft_utils import LoraSettings

EPS = 1e-5
STATES = ("forget", "retain")
Method = Literal["vila", "fila"]
SUFFIX = {"fila": (".base_layer.weight",), "vila": (".lora_A.default.weight", ".lora_B.default.weight")}


def importance_spec(method: Method, lora: LoraSettings, dtype: Literal["float32", "float64"] = "float32") -> FisherSpec:
    """The engine spec: FILA uncentered on the base weights, VILA centered on the LoRA factors."""
    params = [f"*{t}{suffix}" for t in lora.targets for suffix in SUFFIX[method]]
    estimator = "centered" if method == "vila" else "empirical"
    return FisherSpec(estimator=estimator, granularity="microbatch", token_weighted=True, params=params, dtype=dtype)


def record_batch(wrapped: Any, acc: FisherAccumulator, batch: dict[str, torch.Tensor], state: str) -> None:
    """One micro-batch into ``state``: the gradient of its token-mean NLL, weighted by its label tokens."""
    labels, valid = batch["labels"], batch["valid"]
    with acc.record(labels, valid=valid, state=state):
        logits = wrapped.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tokens = label_token_counts(labels).to(logits.dtype) * valid.to(logits.dtype)
        nll = per_sample_nll(logits, labels)
        wrapped.backward((nll * tokens).sum() / tokens.sum().clamp_min(1))
    acc.step()
    wrapped.clear_grads()


def one_pass(wrapped: Any, acc: FisherAccumulator, forget: Sequence[dict[str, torch.Tensor]],
             retain: Sequence[dict[str, torch.Tensor]], passes: int = 1) -> None:
    """Forget and retain micro-batches interleaved (as the official code), each into its own state."""
    for _ in range(passes):
        for f, r in zip_longest(forget, retain):
            for batch, state in ((f, "forget"), (r, "retain")):
                if batch is not None:
                    record_batch(wrapped, acc, batch, state)


def module_name(fqn: str) -> str:
    """The adapted module of a target parameter FQN."""
    for suffix in (*SUFFIX["fila"], *SUFFIX["vila"]):
        if fqn.endswith(suffix):
            return fqn[: -len(suffix)]
    raise ValueError(f"not a FILA/VILA target: {fqn}")


def ratio(forget: torch.Tensor, retain: torch.Tensor) -> torch.Tensor:
    """I = F_f / (eps + F_r), both in the mean convention."""
    return forget.double() / (EPS + retain.double())


def fila_rows(acc: FisherAccumulator) -> dict[str, torch.Tensor]:
    """Row sums of I per module from each rank's fragments (small vectors reduced, no matrix gathered)."""
    counts = {s: acc.states[s].global_counts() for s in STATES}
    frags = {}
    for fqn in acc.targets:
        f, r = (acc.fisher(fqn, counts=counts[s], state=s) for s in STATES)
        frags[fqn] = (acc.fragment(fqn), ratio(f, r))
    sums = summarise(frags, acc.backend.group)
    return {module_name(fqn): sums[f"{fqn}.row"].cpu() for fqn in acc.targets}


def vila_rows(acc: FisherAccumulator, chunk_rows: int = 1024) -> dict[str, torch.Tensor]:
    """Row sums of I = (F_B F_A)_f / (eps + (F_B F_A)_r) per module; the factor Fishers are small and
    gathered, the d_out x d_in products formed a block of rows at a time."""
    out = {}
    for name in sorted({module_name(f) for f in acc.targets}):
        a_fqn, b_fqn = (name + s for s in SUFFIX["vila"])
        fa = {s: acc.full_fisher(a_fqn, state=s).double().cpu() for s in STATES}
        fb = {s: acc.full_fisher(b_fqn, state=s).double().cpu() for s in STATES}
        rows = [ratio(fb["forget"][i : i + chunk_rows] @ fa["forget"], fb["retain"][i : i + chunk_rows] @ fa["retain"]).sum(1)
                for i in range(0, fb["forget"].shape[0], chunk_rows)]
        out[name] = torch.cat(rows)
    return out


def row_importance(method: Method, acc: FisherAccumulator) -> dict[str, torch.Tensor]:
    """``{module FQN: sum_j I_ij}`` (float64, on CPU, the same on every rank; collective)."""
    return fila_rows(acc) if method == "fila" else vila_rows(acc)
