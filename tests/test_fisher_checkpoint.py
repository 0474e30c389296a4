"""Fisher states reshard: save on 2 ranks, load on 1 and 3 and across backends, keep accumulating, and
match the uninterrupted float64 oracle. Bad checkpoints give one clear error."""

from __future__ import annotations

import shutil

import pytest
import torch

from fisherdist.distributed.wrap import wrap_model
from fisherdist.errors import CheckpointError
from fisherdist.fisher import FisherAccumulator, FisherSpec, fisher_step
from fisherdist.fisher.checkpoint import load_fisher, read_fisher, save_fisher
from tests.distributed import run_distributed
from tests.fisher_oracle import dataset, micro_batches, model_dtype, oracle, tiny_llama
from tests.test_fisher_engine import FULL, assert_rel_close

N = 12
SPEC = dict(granularity="microbatch", estimator="centered", params=FULL, dtype="float64")


def phase(rank: int, world: int, backend: str, lo: int, hi: int, mb: int, load: str | None, save: str | None) -> dict:
    w = wrap_model(tiny_llama(dtype=model_dtype(backend)), backend)
    acc = FisherAccumulator(w, FisherSpec(**SPEC))
    if load:
        load_fisher(acc.state, load)
    ids, labels = dataset(N)
    ids, labels = ids[lo:hi], labels[lo:hi]
    for step in micro_batches(hi - lo, world, mb):
        fisher_step(w, acc, {"input_ids": ids[step[rank]], "labels": labels[step[rank]]})
    if save:
        save_fisher(acc.state, save)
    return {"full": {f: acc.full_fisher(f) for f in acc.targets}, "counts": acc.state.global_counts(),
            "local": acc.placement.local_numel(), "total": acc.placement.total_numel()}


def run_phase(world: int, backend: str, lo: int, hi: int, mb: int, load=None, save=None) -> dict:
    if world == 1:
        import torch.distributed as dist  # noqa: F401 - single process needs no group
        return phase(0, 1, "none", lo, hi, mb, load, save)
    return run_distributed(phase, world, backend, lo, hi, mb, load, save, timeout=240)[0]


def combined_oracle(parts: list[tuple[int, int, int, int]]) -> dict[str, torch.Tensor]:
    """Centered Fisher over micro-batches of several phases ``(lo, hi, world, mb)``, recombined from sums."""
    model = tiny_llama()
    ids, labels = dataset(N)
    names = [n for n, _ in model.named_parameters()]
    sq, first, units = {}, {}, 0
    for lo, hi, world, mb in parts:
        k = len(micro_batches(hi - lo, world, mb)) * world
        e = oracle(model, ids[lo:hi], labels[lo:hi], names, "microbatch", "empirical", world, mb)
        r = oracle(model, ids[lo:hi], labels[lo:hi], names, "microbatch", "rank1", world, mb)
        for n in names:
            sq[n] = sq.get(n, 0) + k * e[n]
            first[n] = first.get(n, 0) + k * r[n]
        units += k
    return {n: (sq[n] / units - (first[n] / units) ** 2).clamp_min(0) for n in names}


@pytest.mark.parametrize(
    "first,second",
    # every saving backend once, every loading layout once (more ranks, another backend, one process)
    [(("ddp", 2, 3), ("fsdp2", 3, 2)), (("fsdp2", 2, 3), ("zero3", 2, 3)), (("zero3", 2, 3), ("none", 1, 3))],
    ids=["ddpx2->fsdp2x3", "fsdp2x2->zero3x2", "zero3x2->single"],
)
def test_reshard_and_continue(tmp_path, monkeypatch, first, second):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # inherited by the spawned ranks
    (b1, w1, mb1), (b2, w2, mb2) = first, second
    ck = str(tmp_path / "fisher")
    run_phase(w1, b1, 0, 6, mb1, save=ck)
    resumed = run_phase(w2, b2, 6, N, mb2, load=ck)
    ref = combined_oracle([(0, 6, w1, mb1), (6, N, w2, mb2)])
    for n, got in resumed["full"].items():
        assert_rel_close(got, ref[n].reshape(got.shape), n)
    units = len(micro_batches(6, w1, mb1)) * w1 + len(micro_batches(6, w2, mb2)) * w2
    assert resumed["counts"]["weight"] == units  # resume adds to the counts, it does not restart
    assert resumed["counts"]["samples"] == N


def test_read_fisher_gives_whole_tensors_and_metadata(tmp_path):
    ck = tmp_path / "fisher"
    result = run_phase(2, "fsdp2", 0, N, 3, save=str(ck))
    stats, counts, meta = read_fisher(ck)
    assert meta["estimator"] == "centered" and meta["backend"] == "fsdp2" and meta["world_size"] == 2
    w = counts["weight"]
    for n, got in result["full"].items():
        mean = stats["first"][n] / w
        assert_rel_close((stats["sq"][n] / w - mean**2).clamp_min(0).reshape(got.shape), got, n, tol=1e-12)


def test_bad_checkpoints_are_reported(tmp_path):
    ck = tmp_path / "fisher"
    run_phase(1, "none", 0, 6, 3, save=str(ck))
    acc = FisherAccumulator(tiny_llama(), FisherSpec(**{**SPEC, "params": ["lm_head.weight", "model.norm.weight"]}))
    with pytest.raises(CheckpointError, match="does not target"):
        load_fisher(acc.state, ck)  # checkpoint has more parameters than this run targets
    other = FisherAccumulator(tiny_llama(), FisherSpec(**{**SPEC, "estimator": "empirical"}))
    with pytest.raises(CheckpointError, match="estimator"):
        load_fisher(other.state, ck)
    with pytest.raises(CheckpointError, match="no .*metadata"):
        load_fisher(other.state, tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(ck, broken)
    for shard in broken.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:10])
    fresh = FisherAccumulator(tiny_llama(), FisherSpec(**SPEC))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: 10 bytes, MANIFEST.json recorded \d+ \(truncated"):
        load_fisher(fresh.state, broken)  # the manifest names the damaged file before DCP reads it
    (broken / "MANIFEST.json").unlink()  # a state without its manifest: DCP's read fails, named as one line
    with pytest.raises(CheckpointError, match="shard files"):
        load_fisher(fresh.state, broken)


def test_interrupted_save_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    ck = tmp_path / "fisher"
    first = run_phase(1, "none", 0, 6, 3, save=str(ck))
    import torch.distributed.checkpoint as dcp_module

    def crash(state_dict, checkpoint_id):  # writes part of a checkpoint, then dies
        (tmp_path / ".fisher.tmp").mkdir(exist_ok=True)
        (tmp_path / ".fisher.tmp" / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt

    acc = FisherAccumulator(tiny_llama(), FisherSpec(**SPEC))
    monkeypatch.setattr(dcp_module, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_fisher(acc.state, ck)
    monkeypatch.undo()
    reloaded = FisherAccumulator(tiny_llama(), FisherSpec(**SPEC))
    load_fisher(reloaded.state, ck)  # the previous checkpoint is intact
    for n, got in first["full"].items():
        assert_rel_close(reloaded.full_fisher(n), got, n, tol=1e-12)
    save_fisher(reloaded.state, ck)  # and the leftover temporary directory does not block the next save
    assert not (tmp_path / ".fisher.tmp").exists()
