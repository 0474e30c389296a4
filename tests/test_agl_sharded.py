"""The AGL and EWC penalties on sharded LoRA factors: a short SFT run (``run_sft``, both penalty hooks, a
ragged last step) on 2 gloo ranks under FSDP2 (B's rows in shards, the small factors gathered) and ZeRO-3
(factors partitioned: the penalties enter as gradients of gathered copies) ends on the weights and logged
penalties of the same run in one process."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fisherdist.methods.agl.train import AglPenalty, EwcPenalty
from fisherdist.methods.sft import SftTrain, run_sft
from fisherdist.models.peft_utils import adapted_modules
from tests.distributed import run_distributed
from tests.fisher_oracle import model_dtype
from tests.test_agl_hooks import SCALE, WEIGHTS, _model

SETTINGS = dict(lr=0.2, epochs=1, max_length=12, seed=3, max_grad_norm=1.0, checkpoint_every=None,
                checkpoint_minutes=None)
GLOBAL_BATCH, LAMBDA_EWC = 4, 0.5


def _records() -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(3, 60, (n,), generator=g).tolist()  # noqa: E731
    return [(ids(2 + i % 3), ids(3 + i % 4)) for i in range(10)]  # 10 records, global batch 4: a ragged last step


def _diag(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from fisherdist.methods.agl.adapters import hf_name

    g = torch.Generator().manual_seed(9)
    return {hf_name(m.name): torch.rand(m.module.base_layer.weight.shape, generator=g, dtype=torch.float64) * 2
            for m in adapted_modules(model)}


def _train(backend: str, rank: int, world: int) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    from fisherdist.distributed.wrap import wrap_model

    model = _model().to(model_dtype(backend))  # cast after building: the same weights as the float64 run
    diag = _diag(model)
    options = {"zero_config": {"gradient_clipping": SETTINGS["max_grad_norm"]}} if backend.startswith("zero") else {}
    # SGD, not AdamW: Adam's 1/sqrt(v) turns round-off in a near-zero gradient element into a visible step
    w = wrap_model(model, backend, optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=SETTINGS["lr"]), **options)
    hooks = [AglPenalty(w, WEIGHTS, SCALE), EwcPenalty(w, lambda n, lo, hi: diag[n][lo:hi], LAMBDA_EWC, SCALE)]
    settings = SftTrain(batch_size=GLOBAL_BATCH // world, **SETTINGS)  # type: ignore[arg-type]
    history = run_sft(w, _records(), settings, pad_id=0, hooks=hooks, progress=False)
    return history, w.gather_trainable()


def _sharded(rank: int, world: int) -> dict[str, Any]:
    return {backend: _train(backend, rank, world) for backend in ("fsdp2", "zero3")}


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_two_sharded_ranks_equal_one_process(backend: str, sharded_runs: list[dict[str, Any]], single: Any) -> None:
    want_hist, want_w = single
    assert len(want_hist) == 3 and all(h["agl_loss"] > 0 and h["ewc_penalty"] > 0 for h in want_hist)
    # float64: summation order only (B's curvature gradient arrives from its gathered copy and its rows)
    tol = 1e-8 if model_dtype(backend) == torch.float64 else 2e-4
    for per_backend in sharded_runs:
        hist, weights = per_backend[backend]
        for got, want in zip(hist, want_hist, strict=True):
            for key in ("nll", "agl_loss", "agl_fisher", "agl_curvature", "agl_overlap", "agl_separation", "ewc_penalty"):
                assert got[key] == pytest.approx(want[key], rel=tol), (backend, got["step"], key)
        for name, value in want_w.items():
            torch.testing.assert_close(weights[name].double(), value, rtol=tol, atol=tol * 1e-2)
    start = dict(_model().named_parameters())
    assert max(float((want_w[n] - start[n]).abs().max()) for n in want_w) > 1e-3  # the comparison is not vacuous


@pytest.fixture(scope="module")
def sharded_runs() -> list[dict[str, Any]]:
    """One 2-rank launch runs both backends (the ranks' start-up is most of the cost)."""
    return run_distributed(_sharded, 2, timeout=240)


@pytest.fixture(scope="module")
def single() -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    return _train("none", 0, 1)


@pytest.mark.parametrize("override, says", [(["dist.backend=fsdp1", "dist.nproc=2"], "dist.backend=fsdp1"),
                                            (["dist.backend=ddp", "model.load=sharded"], "model.load=sharded")])
def test_unsupported_setups_are_refused_before_loading(capsys: pytest.CaptureFixture, tmp_path: Any,
                                                       override: list[str], says: str) -> None:
    from pathlib import Path

    from fisherdist import cli

    config = Path(__file__).resolve().parent.parent / "configs" / "agl" / "tiny.yaml"
    assert cli.main(["agl", "fisher", str(config), f"out={tmp_path}", *override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not (tmp_path / "fisher").exists()
