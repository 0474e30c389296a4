"""SUV training (DPO + Fisher barrier + retain projection): 2-rank FSDP2 and ZeRO-2/3 equal
one process step for step. ZeRO-3 adds the barrier's gradient to DeepSpeed's partitioned gradients (the LoRA
factors exist only inside its forward), a different code path that must land on the same weights."""

import torch

from fisherdist.fisher.layout import Placement
from fisherdist.methods.suv.config import TrainSettings
from fisherdist.methods.suv.train import SuvTrainer
from fisherdist.recipes.preference import PairTokens
from tests.distributed import run_distributed
from tests.fisher_oracle import model_dtype
from tests.test_suv_regularizer import barrier_for, random_fishers, tiny_peft

SETTINGS = dict(lr=5e-3, epochs=2, lam=0.05, projection=True, max_grad_norm=1.0, seed=3, max_length=24)


def make_data():
    g = torch.Generator().manual_seed(11)
    rand = lambda n: torch.randint(3, 40, (n,), generator=g).tolist()  # noqa: E731
    pairs = [PairTokens(rand(3 + i % 4), rand(4 + i % 3), rand(5 + i % 2)) for i in range(7)]  # 7: a ragged last step
    retain = [rand(6 + i % 5) for i in range(5)]
    return pairs, retain


def train_once(backend, rank, world, batch_size, **overrides):
    from fisherdist.distributed.wrap import wrap_model

    model = tiny_peft().to(model_dtype(backend))  # cast after building: the same weights as the float64 run
    fishers = random_fishers(model)
    pairs, retain = make_data()
    settings = {**SETTINGS, **overrides}
    options = {"zero_config": {"gradient_clipping": settings["max_grad_norm"]}} if backend.startswith("zero") else {}
    w = wrap_model(model, backend, optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=settings["lr"]), **options)
    placement = (lambda s: Placement.rows(s, rank, world)) if backend == "fsdp2" else (lambda s: Placement.flat_chunks(s, rank, world))
    barrier = barrier_for(w.unwrapped, fishers, placement)
    cfg = TrainSettings(batch_size=batch_size, retain_batch_size=2 // world, **settings)
    history = SuvTrainer(w, pairs, retain, cfg, pad_id=0, barrier=barrier).run(progress=False)
    return history, w.gather_trainable()


def _fsdp2(rank, world):
    return train_once("fsdp2", rank, world, batch_size=2)


def test_fsdp2_two_ranks_equals_single_process():
    want_hist, want_w = train_once("none", 0, 1, batch_size=4)
    assert len(want_hist) == 4 and all(h["fisher_reg"] > 0 for h in want_hist)
    for hist, weights in run_distributed(_fsdp2, 2, timeout=150):
        for a, b in zip(hist, want_hist):
            assert abs(a["dpo"] - b["dpo"]) < 1e-9 and abs(a["fisher_reg"] - b["fisher_reg"]) < 1e-9 * b["fisher_reg"]
        for n, t in want_w.items():
            torch.testing.assert_close(weights[n], t, rtol=1e-8, atol=1e-10)
    moved = max((t - tiny_peft().state_dict()[n]).abs().max().item() for n, t in want_w.items())
    assert moved > 1e-3  # training changed the adapter, so the comparison is not vacuous


def _zero(rank, world):
    return {stage: train_once(stage, rank, world, batch_size=2) for stage in ("zero2", "zero3")}


def _fisher_pass_on_training_engine(rank, world):
    """The SUV Fisher pass runs on the training engine and clears gradients without an optimizer step."""
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.methods.suv.config import FisherSettings
    from fisherdist.methods.suv.fisher_pass import run_pass
    from fisherdist.models.peft_utils import LoraSettings

    out = {}
    for stage in ("zero2", "zero3"):
        model = tiny_peft(dtype=torch.float32)  # DeepSpeed keeps float32 masters: a float64 model would round
        w = wrap_model(model, stage, optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1))
        before = w.gather_trainable()
        tokens = [list(range(3, 9 + i)) for i in range(6)]
        run_pass(w, tokens, FisherSettings(batch_size=2), LoraSettings(r=4, alpha=8, dropout=0.0), 0, progress=False).close()
        out[stage] = (before, w.gather_trainable(), [g["lr"] for g in w.optimizer.param_groups],
                      len(w.optimizer.optimizer.state))
    return out


def test_fisher_pass_leaves_weights_and_optimizer_untouched():
    for per_stage in run_distributed(_fisher_pass_on_training_engine, 2, timeout=300):
        for stage, (before, after, lrs, states) in per_stage.items():
            assert all(torch.equal(before[n], after[n]) for n in before), stage
            assert lrs == [0.1] * len(lrs) and states == 0, stage


def test_zero2_zero3_two_ranks_equal_single_process():
    want_hist, want_w = train_once("none", 0, 1, batch_size=4)
    for per_stage in run_distributed(_zero, 2, timeout=300):
        for stage, (hist, weights) in per_stage.items():
            for a, b in zip(hist, want_hist, strict=True):
                assert abs(a["dpo"] - b["dpo"]) < 1e-6, stage
                assert abs(a["fisher_reg"] - b["fisher_reg"]) < 1e-6 * b["fisher_reg"], stage
            for n, t in want_w.items():
                # ZeRO-2 (float64 model, float32 masters) and ZeRO-3 (float32 model) land at float32 round-off.
                torch.testing.assert_close(weights[n].double(), t, rtol=1e-5, atol=1e-7, msg=lambda m, where=f"{stage} {n}": f"{where}: {m}")
