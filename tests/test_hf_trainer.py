"""FisherCallback inside a real ``transformers.Trainer`` on 2 gloo ranks: the exported Fisher equals the
float64 oracle (which computes every sample's mean token NLL itself) whatever the Trainer's loss averaging,
and a run resumed from a Trainer checkpoint equals an uninterrupted one. ZeRO-3 is refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.fisher_oracle import dataset, oracle, tiny_llama

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


def _no_shm_jit() -> None:
    """The Trainer starts DeepSpeed through accelerate, not through fisherdist's wrapper: apply the wrapper's
    CPU opt-out of DeepSpeed's JIT-built shared-memory op (``wrap_deepspeed._import_deepspeed``) first."""
    from fisherdist.distributed.wrap_deepspeed import _import_deepspeed

    _import_deepspeed(2)


def _train(out: Path, save: Path, zero: int | None, resume: str | None = None, **kw: object) -> None:
    from transformers import Trainer

    from fisherdist.fisher.spec import FisherSpec
    from fisherdist.integrations.hf import FisherCallback

    cb = FisherCallback(spec=FisherSpec(params=TARGETS, dtype="float64"), save_dir=save)
    trainer = Trainer(model=tiny_llama(0), args=_args(out, zero, **kw), train_dataset=Rows(), callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)


def _exported(save: Path) -> dict[str, torch.Tensor]:
    from fisherdist.fisher.checkpoint import read_fisher
    from fisherdist.fisher.export import mean_fisher

    stats, counts, meta = read_fisher(save / "fisher")
    shapes = meta["shapes"]
    return {f: t.reshape(shapes[f]) for f, t in mean_fisher(stats, "empirical", counts["weight"]).items()} | {
        "_samples": torch.tensor(counts["samples"])}


def _worker(rank: int, world: int, root: str) -> dict[str, dict[str, torch.Tensor]]:
    """Uninterrupted ZeRO-2 run (tokens averaged across ranks, the default), then a run resumed from its
    checkpoint-1 with each rank averaging its own tokens: both must give the oracle."""
    _no_shm_jit()
    base = Path(root)
    _train(base / "a", base / "fa", 2)
    out = {"full": _exported(base / "fa")}
    _train(base / "a", base / "fb", 2, resume=str(base / "a" / "checkpoint-1"), average_tokens_across_devices=False)
    out["resumed"] = _exported(base / "fb")
    out["ckpt_files"] = {"n": torch.tensor(len(list((base / "a" / "checkpoint-1" / "fisher").glob("*.distcp"))))}
    return out


def _expected() -> dict[str, torch.Tensor]:
    rows = Rows()
    return oracle(tiny_llama(0), rows.ids, rows.labels, TARGETS, "sample", "empirical", world=1, mb=1)


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name in TARGETS:
        # the Trainer's loss runs in float32 (HF upcasts logits to float32, not float64): elements that are
        # sums of cancelling terms carry float32 rounding, so the absolute floor is 1e-6 of the largest
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-6 * float(want[name].abs().max()))


def test_trainer_zero2_fisher_matches_oracle_and_resumes(tmp_path):
    os.environ["DS_ACCELERATOR"] = "cpu"
    got = run_distributed(_worker, WORLD, str(tmp_path), timeout=600)[0]
    want = _expected()
    assert float(got["full"]["_samples"]) == N
    _close(got["full"], want)
    assert int(got["ckpt_files"]["n"]) == WORLD  # each rank wrote its shard with the Trainer checkpoint
    assert float(got["resumed"]["_samples"]) == N
    _close(got["resumed"], want)


def test_zero3_is_refused_in_one_line():
    """A ZeRO-3 model (parameters carrying DeepSpeed's ``ds_tensor`` partition) stops the callback before any
    accumulation: on 2 gloo ranks its Fisher differed from the oracle while ZeRO-2 matched."""
    from fisherdist.errors import FisherdistError
    from fisherdist.integrations.hf import FisherCallback

    model = tiny_llama(0)
    model.lm_head.weight.ds_tensor = torch.zeros(1)
    with pytest.raises(FisherdistError) as err:
        FisherCallback().on_train_begin(None, None, None, model=model)  # type: ignore[arg-type]
    assert "ZeRO-3" in str(err.value) and "\n" not in str(err.value)

