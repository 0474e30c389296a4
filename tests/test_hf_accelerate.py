"""The Trainer callback's tracker on loops we do not own, 2 gloo ranks, against the float64 oracle: a model
prepared by a plain ``accelerate.Accelerator`` (DDP on CPU: accelerate enables FSDP only on GPU
distributed types) with its own gradient-accumulation loss scaling, and an FSDP2 (``fully_shard``) model
trained on an arbitrarily scaled HF loss. One process: outputs replaced by a framework's forward hook (as
DeepSpeed ZeRO-3 does) still match the oracle, or are refused when the hook runs ahead of the tracker; a
loss that is not a scaled token NLL is refused."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.fisher_oracle import dataset, oracle, tiny_llama

N, MB, GAS, WORLD = 12, 2, 2, 2
TARGETS = ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight",
           "model.layers.0.input_layernorm.weight"]


def _rows() -> list[dict[str, torch.Tensor]]:
    ids, labels = dataset(N)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(N)]


def _spec():  # type: ignore[no-untyped-def]
    from fisherdist.fisher.spec import FisherSpec

    return FisherSpec(params=TARGETS, dtype="float64")


def _gathered(tracker) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = {f: tracker.acc.full_fisher(f) for f in TARGETS}
    out["_samples"] = torch.tensor(tracker.acc.num_samples())
    tracker.close()
    return out


def _accelerate_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    from accelerate import Accelerator

    from fisherdist.integrations.capture import FisherTracker

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GAS)
    model = tiny_llama(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = torch.utils.data.DataLoader(_rows(), batch_size=MB)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    tracker = FisherTracker(accelerator.unwrap_model(model), _spec())  # finds the DDP wrapper itself
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)  # token mean of the micro-batch, / GAS by accelerate
            tracker.end_micro_batch(optimizer_step=accelerator.sync_gradients)
            opt.step()
            opt.zero_grad()
    assert tracker.acc.backend.name == "ddp"
    return _gathered(tracker)


def _fsdp2_worker(rank: int, world: int, scale: float) -> dict[str, torch.Tensor]:
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.integrations.capture import FisherTracker

    model = wrap_model(tiny_llama(0), "fsdp2").module
    tracker = FisherTracker(model, _spec())
    mine = _rows()[rank::world]
    for start in range(0, len(mine), MB):
        rows = mine[start : start + MB]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        loss = model(**batch).loss * scale
        loss.backward()
        tracker.end_micro_batch()
        model.zero_grad(set_to_none=True)
    assert tracker.acc.backend.name == "fsdp2"
    tracker.check()  # the scaled HF loss is a scaled token NLL: no residual
    return _gathered(tracker)


def _both(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """One spawn for both loops (the start-up of a rank costs more than either loop)."""
    return {"accelerate": _accelerate_worker(rank, world), "fsdp2": _fsdp2_worker(rank, world, 0.37)}


def _expected() -> dict[str, torch.Tensor]:
    ids, labels = dataset(N)
    return oracle(tiny_llama(0), ids, labels, TARGETS, "sample", "empirical", world=1, mb=1)


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert float(got["_samples"]) == N
    for name in TARGETS:  # HF upcasts logits to float32 for the loss: float32 rounding on cancelling sums
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * float(want[name].abs().max()))


def test_plain_accelerator_and_fsdp2_models_match_oracle():
    got = run_distributed(_both, WORLD, timeout=600)[0]
    want = _expected()
    _close(got["accelerate"], want)
    _close(got["fsdp2"], want)


class _Reattach(torch.autograd.Function):
    """What DeepSpeed ZeRO-3's module forward hook does to every output (``PreBackwardFunctionForModule``)."""

    @staticmethod
    def forward(ctx, t):  # type: ignore[no-untyped-def]
        return t.detach()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g


def _replace_logits(module, args, out):  # type: ignore[no-untyped-def]
    out.logits = _Reattach.apply(out.logits)  # the loss was computed inside forward from the original logits
    return out


def test_outputs_replaced_by_a_framework_hook():
    """A framework that hooked the model first (ZeRO-3 at ``deepspeed.initialize``) and replaces its outputs
    does not hide the logits' gradient from the tracker; one that gets ahead of the tracker is refused."""
    from fisherdist.errors import FisherdistError
    from fisherdist.integrations.capture import FisherTracker

    model = tiny_llama(0)
    model.register_forward_hook(_replace_logits)
    tracker = FisherTracker(model, _spec())
    ids, labels = dataset(N)
    for start in range(0, N, MB):
        (model(input_ids=ids[start : start + MB], labels=labels[start : start + MB]).loss * 0.3).backward()
        tracker.end_micro_batch()
    got = _gathered(tracker)
    _close(got, oracle(tiny_llama(0), ids, labels, TARGETS, "sample", "empirical", world=1, mb=1))
    tracker = FisherTracker(model, _spec())
    model.register_forward_hook(_replace_logits, prepend=True)
    model(input_ids=ids[:MB], labels=labels[:MB]).loss.backward()
    with pytest.raises(FisherdistError, match="never reached the model's output logits") as err:
        tracker.end_micro_batch()
    assert "\n" not in str(err.value)
    tracker.close()


def test_loss_factors_flag_a_loss_that_is_not_a_scaled_nll():
    from fisherdist.integrations.capture import loss_factors

    ids, labels = dataset(3)
    logits = torch.randn(3, ids.shape[1], 64, dtype=torch.float64, requires_grad=True)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), reduction="sum")
    (grad,) = torch.autograd.grad(nll * 0.25, logits)
    factors, residual = loss_factors(logits.detach(), labels, grad)
    tokens = (labels[:, 1:] != -100).sum(1).double()
    torch.testing.assert_close(factors, 0.25 * tokens)
    assert float(residual.max()) < 1e-10
    smooth = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1),
                                               reduction="sum", label_smoothing=0.1)
    (grad,) = torch.autograd.grad(smooth, logits)
    assert float(loss_factors(logits.detach(), labels, grad)[1].max()) > 1e-2


@pytest.mark.parametrize("estimator,granularity", [("true", "sample"), ("empirical", "microbatch")])
def test_callback_refuses_what_it_cannot_rescale(estimator, granularity):
    from fisherdist.errors import FisherdistError
    from fisherdist.fisher.spec import FisherSpec
    from fisherdist.integrations.capture import check_spec

    with pytest.raises(FisherdistError, match="estimator empirical at granularity sample"):
        check_spec(FisherSpec(estimator=estimator, granularity=granularity))
