"""The shared trainer's pieces against brute force: the data plan (ragged steps, 1-3 ranks, resume position),
the lr schedule, and a preempted + resumed single-process run against a hand-written loop."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from fisherdist.recipes.train_config import OptimSettings
from fisherdist.recipes.trainer import DataPlan, StepBatch, Trainer, TrainHook, TrainingPreempted, lr_factor


@pytest.mark.parametrize(("records", "global_batch", "world"), [(7, 4, 2), (7, 4, 3), (8, 4, 1), (5, 3, 2), (1, 2, 2)])
def test_data_plan_covers_every_record_once_per_epoch(records: int, global_batch: int, world: int) -> None:
    plan = DataPlan(records, global_batch, epochs=3, seed=5)
    g = torch.Generator().manual_seed(5)
    orders = [torch.randperm(records, generator=g).tolist() for _ in range(3)]
    per_rank = [list(plan.steps(0, r, world)) for r in range(world)]
    assert len(per_rank[0]) == plan.total_steps == 3 * -(-records // global_batch)
    for epoch, order in enumerate(orders):
        steps = [s for s in per_rank[0] if (s.step - 1) // plan.steps_per_epoch == epoch]
        assert [i for s in steps for i in s.records] == order  # the epoch's permutation, in order, once
        for k, s in enumerate(steps):
            slots = [i for r in range(world) for i in per_rank[r][epoch * plan.steps_per_epoch + k].mine]
            assert [i for i in slots if i >= 0] == s.records and s.n_real == len(s.records)
    resumed = [s.records for s in plan.steps(4, 0, world)]
    assert resumed == [s.records for s in per_rank[0][4:]]  # the position is one integer on any world size


def test_data_plan_max_steps() -> None:
    plan = DataPlan(10, 3, epochs=5, seed=0, max_steps=6)
    assert plan.total_steps == 6 and [s.step for s in plan.steps(2, 0, 1)] == [3, 4, 5, 6]


def test_lr_schedules() -> None:
    total = 11
    for kind in ("constant", "linear", "cosine"):
        cfg = OptimSettings(lr_schedule=kind, warmup_steps=3)
        f = [lr_factor(cfg, s, total) for s in range(1, total + 1)]
        assert f[:3] == pytest.approx([1 / 4, 2 / 4, 3 / 4])  # linear warmup towards 1
        after = [(s - 3) / (total - 3) for s in range(4, total + 1)]
        want = {"constant": [1.0] * len(after), "linear": [1 - x for x in after],
                "cosine": [(1 + math.cos(math.pi * x)) / 2 for x in after]}[kind]  # fmt: skip
        assert f[3:] == pytest.approx(want)
    assert lr_factor(OptimSettings(), 1, total) == 1.0  # default: the configured lr exactly


# ---- a preempted and resumed run against a hand-written loop ------------------------------------------
X = torch.randn(9, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3
CFG = dict(lr=0.05, epochs=3, batch_size=4, seed=7, lr_schedule="cosine", warmup_steps=1, max_grad_norm=0.5,
           checkpoint_every=None, checkpoint_minutes=None)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1).double()


class StopAt(TrainHook):
    name = "stop"

    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self, batch: StepBatch, row: dict) -> None:
        if batch.step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


def _train(ckpt: Path, stop_at: int = -1) -> tuple[list[dict], torch.nn.Module]:
    from fisherdist.distributed.wrap import wrap_model

    model = _model()
    w = wrap_model(model, "none", optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=CFG["lr"]))

    def loss(batch: StepBatch) -> torch.Tensor:
        idx = torch.tensor([i for i in batch.mine if i >= 0])
        return ((model(X[idx]) - Y[idx]) ** 2).sum() / batch.n_real

    trainer = Trainer(w, len(X), OptimSettings(**CFG), loss, hooks=[StopAt(stop_at)], checkpoint_dir=ckpt)
    return trainer.run(progress=False), model


def _oracle() -> torch.nn.Module:
    """Plain loop: seeded permutations, global mean loss, clip, warmup + cosine lr, AdamW."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=CFG["lr"])
    g = torch.Generator().manual_seed(CFG["seed"])
    total, step = 3 * 3, 0
    for _ in range(3):
        order = torch.randperm(9, generator=g)
        for j in range(3):
            step += 1
            idx = order[4 * j : 4 * j + 4]
            ((model(X[idx]) - Y[idx]) ** 2).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            frac = (step - 1) / (total - 1)
            opt.param_groups[0]["lr"] = CFG["lr"] * (0.5 if step == 1 else (1 + math.cos(math.pi * frac)) / 2)
            opt.step()
            opt.zero_grad()
    return model


def test_preempted_run_resumes_to_the_plain_loop(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(TrainingPreempted) as stop:
        _train(tmp_path / "ckpt", stop_at=4)
    assert stop.value.code == 75 and stop.value.step == 4
    capsys.readouterr()
    history, model = _train(tmp_path / "ckpt")
    assert capsys.readouterr().out.startswith("train: resuming from step 4 of 9")
    assert [r["step"] for r in history] == list(range(1, 10))
    want = _oracle()
    for a, b in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not (tmp_path / "ckpt").exists()


def test_add_full_grad_single_process() -> None:
    """The extra-gradient path on a plain model: added to an existing gradient, or becomes the gradient."""
    from fisherdist.distributed.wrap import wrap_model

    model = _model()
    w = wrap_model(model, "none")
    ((model(X) - Y) ** 2).sum().backward()
    before = model.weight.grad.clone()
    extra = torch.randn(model.weight.numel(), dtype=torch.float64)  # flat: reshaped to the parameter
    w.add_full_grad(model.weight, extra)
    torch.testing.assert_close(model.weight.grad, before + extra.view(1, 3), rtol=0, atol=0)
    model.bias.grad = None
    w.add_full_grad(model.bias, torch.ones(1, dtype=torch.float64))
    assert model.bias.grad.tolist() == [1.0]
