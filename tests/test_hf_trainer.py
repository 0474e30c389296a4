"""FisherCallback inside a real ``transformers.Trainer`` under DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks:
the exported Fisher equals the float64 oracle (which computes every sample's mean token NLL itself) whatever
the Trainer's loss averaging, and a run resumed from a Trainer checkpoint equals an uninterrupted one. The
ZeRO-3 model is partitioned once by ``from_pretrained`` (``zero.Init``), once by ``deepspeed.initialize``.
Importing the integration turns off DeepSpeed's JIT-built CPU shm op (accelerate starts DeepSpeed itself)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.fisher_oracle import dataset, model_dtype, oracle, tiny_llama
from tests.test_fisher_engine import assert_rel_close

pytest.importorskip("deepspeed")

N, MB, GAS, WORLD = 16, 2, 2, 2  # 2 optimizer steps of 2 micro-batches on 2 ranks
TARGETS = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight",
           "model.norm.weight", "model.embed_tokens.weight"]


class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.ids, self.labels = dataset(N)
        self.labels[5, :] = -100  # a sample with no label token: counted, zero gradient

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _args(out: Path, zero: int | None, **kw: object):  # type: ignore[no-untyped-def]
    from transformers import TrainingArguments

    ds = {"zero_optimization": {"stage": zero}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "train_batch_size": "auto"} if zero else None
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=MB, gradient_accumulation_steps=GAS,
                             learning_rate=0.0, use_cpu=True, report_to=[], logging_steps=1, deepspeed=ds,
                             max_steps=2, save_strategy="steps", save_steps=1, seed=3, **kw)


def _model(zero: int, saved: Path, load: bool) -> torch.nn.Module:
    """ZeRO-2: the float64 model. ZeRO-3 (float32: DeepSpeed partitions no float64; same weights): with
    ``load``, ``from_pretrained`` after the ``TrainingArguments``, as users do, which partitions it while
    loading (``zero.Init``); else built whole and partitioned by ``deepspeed.initialize``."""
    from transformers import LlamaForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if zero != 3:
        return tiny_llama(0)
    if not load:
        return tiny_llama(0, model_dtype("zero3"))
    assert is_deepspeed_zero3_enabled()  # the arguments made from_pretrained partition while loading
    import deepspeed  # zero.Init needs DeepSpeed's comm layer, which use_cpu leaves down (as the example does)

    deepspeed.comm.init_distributed(dist_backend="gloo", dist_init_required=False)
    model = LlamaForCausalLM.from_pretrained(saved, attn_implementation="eager")
    assert all(hasattr(p, "ds_tensor") for p in model.parameters())
    return model


def _train(out: Path, save: Path, zero: int, resume: str | None = None, **kw: object) -> None:
    from transformers import Trainer

    from fisherdist.fisher.spec import FisherSpec
    from fisherdist.integrations.hf import FisherCallback

    cb = FisherCallback(spec=FisherSpec(params=TARGETS, dtype="float64"), save_dir=save)
    args = _args(out, zero, **kw)
    model = _model(zero, out.parent.parent / "model", load=resume is None)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    assert all(hasattr(p, "ds_tensor") == (zero == 3) for p in model.parameters())


def _exported(save: Path) -> dict[str, torch.Tensor]:
    from fisherdist.fisher.checkpoint import read_fisher
    from fisherdist.fisher.export import mean_fisher

    stats, counts, meta = read_fisher(save / "fisher")
    shapes = meta["shapes"]
    return {f: t.reshape(shapes[f]) for f, t in mean_fisher(stats, "empirical", counts["weight"]).items()} | {
        "_samples": torch.tensor(counts["samples"])}


def _worker(rank: int, world: int, root: str, zero: int) -> dict[str, dict[str, torch.Tensor]]:
    """An uninterrupted run (tokens averaged across ranks, the default), then a run resumed from its
    checkpoint-1 with each rank averaging its own tokens: both must give the oracle."""
    base = Path(root) / f"zero{zero}"
    _train(base / "a", base / "fa", zero)
    out = {"full": _exported(base / "fa")}
    _train(base / "a", base / "fb", zero, resume=str(base / "a" / "checkpoint-1"), average_tokens_across_devices=False)
    out["resumed"] = _exported(base / "fb")
    out["ckpt_files"] = {"n": torch.tensor(len(list((base / "a" / "checkpoint-1" / "fisher").glob("*.distcp"))))}
    return out


def _shm_op_after_import() -> bool:
    """Whether DeepSpeed would still JIT-build its CPU shared-memory op after ``fisherdist.integrations.hf``
    is imported (accelerate starts DeepSpeed's comm layer itself); the module is reloaded because the
    rank already imported it, and the forkserver's preload already turned the op off."""
    import importlib

    import deepspeed

    import fisherdist.integrations.hf as hf

    ops = deepspeed.ops.__compatible_ops__
    ops["deepspeed_shm_comm"] = True
    try:
        importlib.reload(hf)
        return bool(ops["deepspeed_shm_comm"])
    finally:
        ops["deepspeed_shm_comm"] = False  # never build it in this test, whatever the answer


def _both(rank: int, world: int, root: str) -> dict[object, object]:
    """One launch for both stages (a rank's start-up costs as much as a run)."""
    import torch.distributed as dist

    out: dict[object, object] = {"shm_op": _shm_op_after_import()}
    if rank == 0:
        tiny_llama(0, model_dtype("zero3")).save_pretrained(Path(root) / "model")
    dist.barrier()
    return out | {zero: _worker(rank, world, root, zero) for zero in (2, 3)}


def _expected() -> dict[str, torch.Tensor]:
    rows = Rows()
    return oracle(tiny_llama(0), rows.ids, rows.labels, TARGETS, "sample", "empirical", world=1, mb=1)


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], zero: int) -> None:
    for name in TARGETS:
        if zero == 3:  # float32 model: norm-wise, as tests/test_fisher_zero.py checks its ZeRO-3 engine
            assert_rel_close(got[name].double(), want[name], name)
            continue
        # the Trainer's loss runs in float32 (HF upcasts logits to float32, not float64): elements that are
        # sums of cancelling terms carry float32 rounding, so the absolute floor is 1e-6 of the largest
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-6 * float(want[name].abs().max()))


def test_trainer_zero2_zero3_fisher_matches_oracle_and_resumes(tmp_path):
    os.environ["DS_ACCELERATOR"] = "cpu"
    runs = run_distributed(_both, WORLD, str(tmp_path), timeout=600)[0]
    assert runs.pop("shm_op") is torch.cuda.is_available()  # off without CUDA
    want = _expected()
    for zero, got in runs.items():
        assert float(got["full"]["_samples"]) == N, zero
        _close(got["full"], want, zero)
        assert int(got["ckpt_files"]["n"]) == WORLD  # each rank wrote its shard with the Trainer checkpoint
        assert float(got["resumed"]["_samples"]) == N, zero
        _close(got["resumed"], want, zero)
