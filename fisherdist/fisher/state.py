"""FisherState: the sharded running sums, their counts and what they mean, checkpointable with DCP.

Each rank holds only its fragments (``Placement``), ~1/N of every statistic. ``state_dict()`` exposes them
as sharded tensors keyed by parameter FQN (never by rank), so ``torch.distributed.checkpoint`` can load a
state written by N ranks under one backend into M ranks under another. Counts are kept as local
increments (no host sync while accumulating) on top of a global base restored from a checkpoint.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import init_from_local_shards
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torch.distributed._shard.sharded_tensor.shard import Shard

from fisherdist.errors import CheckpointError
from fisherdist.fisher.layout import Fragment, Placement

COUNTERS = ("weight", "samples", "tokens", "skipped", "steps")
#: counters an online (EMA) Fisher decays with its sums, so sums / counts stay the bias-corrected mean
DECAYED = ("weight", "samples", "tokens")


def _sharded(flat: torch.Tensor, frag: Fragment, full_numel: int, rank: int, group: dist.ProcessGroup | None) -> ShardedTensor:
    """A 1-D sharded tensor over ``param.view(-1)`` with this rank's irregular range (DCP reshards it)."""
    shards = []
    if frag.numel > 0:
        meta = ShardMetadata([frag.start], [frag.numel], f"rank:{rank}/{flat.device}")
        shards = [Shard(flat, meta)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ShardedTensor is the only DCP type for irregular ranges
        return init_from_local_shards(shards, full_numel, process_group=group)


class FisherState:
    """Sharded statistic buffers + counters + metadata; implements DCP's ``Stateful`` protocol."""

    def __init__(
        self,
        placement: Placement,
        stats: tuple[str, ...],
        meta: dict[str, Any],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        replicated_counters: tuple[str, ...] = (),
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.placement = placement
        self.stats = stats
        self.meta = dict(meta)
        self.group = group
        # batch granularity sees the already-reduced gradient: every rank counts the same step once, so
        # its weight/steps are replicated while samples/tokens are still per-rank and summed.
        self.replicated_counters = replicated_counters
        self.buffers: dict[str, dict[str, torch.Tensor]] = {
            s: {f: torch.zeros(placement.fragment(f).numel, dtype=dtype, device=device) for f in placement.shapes}
            for s in stats
        }
        self.local_counts = {c: torch.zeros((), dtype=torch.float64, device=device) for c in COUNTERS}
        self.base_counts = {c: 0.0 for c in COUNTERS}
        #: an online Fisher decays before the first statistics of the next optimizer step: set by the
        #: accumulator at an optimizer step, and by a load (checkpoints are taken between optimizer steps)
        self.decay_due = False

    # -- accumulation -------------------------------------------------------------------------------
    def add(self, stat: str, fqn: str, fragment_values: torch.Tensor) -> None:
        buf = self.buffers[stat][fqn]
        buf.add_(fragment_values.reshape(-1)[: buf.numel()].to(buf.dtype))

    def count(self, **increments: torch.Tensor | float) -> None:
        for name, value in increments.items():
            self.local_counts[name] += value

    def decay(self, factor: float) -> None:
        """Online Fisher: ``S <- factor * S`` and the same for the normalising counts, before a new step adds
        to them, so ``S / counts.weight`` is the bias-corrected EMA (an exponentially weighted mean)."""
        for per_fqn in self.buffers.values():
            for buf in per_fqn.values():
                buf.mul_(factor)
        for c in DECAYED:
            self.local_counts[c].mul_(factor)
            self.base_counts[c] *= factor

    def reset(self) -> None:
        for per_fqn in self.buffers.values():
            for buf in per_fqn.values():
                buf.zero_()
        for c in COUNTERS:
            self.local_counts[c].zero_()
            self.base_counts[c] = 0.0
        self.decay_due = False

    # -- reading ------------------------------------------------------------------------------------
    def global_counts(self) -> dict[str, float]:
        """Counts over all ranks (one collective)."""
        local = torch.stack([self.local_counts[c] for c in COUNTERS])
        summed = local.clone()
        if dist.is_initialized() and self.placement.world > 1:
            dist.all_reduce(summed, group=self.group)
        return {
            c: self.base_counts[c] + float(loc if c in self.replicated_counters else tot)
            for c, loc, tot in zip(COUNTERS, local.tolist(), summed.tolist())
        }

    def fragment(self, fqn: str) -> Fragment:
        return self.placement.fragment(fqn)

    # -- checkpoint (Stateful) ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rank = self.placement.rank
        if self.placement.world == 1:  # a whole tensor; DCP still reshards it into N-rank fragments on load
            stats = {s: dict(per_fqn) for s, per_fqn in self.buffers.items()}
        else:
            stats = {
                s: {
                    f: _sharded(buf, self.placement.fragment(f), int(torch.Size(self.placement.shapes[f]).numel()), rank, self.group)
                    for f, buf in per_fqn.items()
                }
                for s, per_fqn in self.buffers.items()
            }
        counts = {c: torch.tensor(v, dtype=torch.float64) for c, v in self.global_counts().items()}
        return {"stats": stats, "counts": counts, "meta": json.dumps(self.meta, sort_keys=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called by ``dcp.load`` after it filled the tensors of :meth:`state_dict` in place."""
        saved_meta = json.loads(state["meta"]) if isinstance(state.get("meta"), str) else {}
        for key in ("estimator", "granularity", "token_weighted"):
            if key in saved_meta and saved_meta[key] != self.meta.get(key):
                raise CheckpointError(
                    f"Fisher checkpoint has {key}={saved_meta[key]!r} but this run uses {self.meta.get(key)!r}"
                )
        for s, per_fqn in state["stats"].items():
            for f, st in per_fqn.items():
                if isinstance(st, ShardedTensor):
                    local = st.local_shards()
                    if local:
                        self.buffers[s][f].copy_(local[0].tensor)
                else:
                    self.buffers[s][f].copy_(st)
        self.base_counts = {c: float(state["counts"][c]) for c in COUNTERS}
        for c in COUNTERS:
            self.local_counts[c].zero_()
        self.decay_due = self.base_counts["steps"] > 0
        self.meta["resumed_from"] = saved_meta
