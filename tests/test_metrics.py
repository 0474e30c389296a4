"""Metrics sinks read back with their own readers: metrics.jsonl, TensorBoard event files (tensorboard's
EventAccumulator), an offline W&B run directory; and the fisher command's Fisher summaries (streaming a
Parquet file) against the exported Fisher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fisherdist.metrics import LogSettings, MetricsLogger, WandbSettings, scalars, target_group
from tests.tiny_hf import build_model_dir, texts


def _events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_sink_gets_each_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = [{"loss": 2.5 - s, "lr": 1e-3 * s, "records": [s, s + 1], "grad_norm": torch.tensor(0.5 * s)} for s in (1, 2, 3)]
    logger = MetricsLogger(tmp_path, LogSettings(tensorboard=True, wandb=WandbSettings(project="fd-test")))
    for s, row in enumerate(rows, start=1):
        logger.log(s, row)
    logger.log(1, {"loss": 9.0}, stage="arm b")  # a second trainer restarting at step 1
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines.pop() == {"step": 1, "time": pytest.approx(lines[-1]["time"], abs=60), "stage": "arm b", "loss": 9.0}
    assert [r["step"] for r in lines] == [1, 2, 3] and all(isinstance(r["time"], float) for r in lines)
    assert [r["loss"] for r in lines] == [1.5, 0.5, -0.5] and [r["grad_norm"] for r in lines] == [0.5, 1.0, 1.5]
    assert "records" not in lines[0]
    events = _events(tmp_path / "tensorboard")
    assert events["loss"] == [(1, 1.5), (2, 0.5), (3, -0.5)] and events["arm_b/loss"] == [(1, 9.0)]
    assert [v for _, v in events["lr"]] == pytest.approx([1e-3, 2e-3, 3e-3])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_resume_appends_and_log_step_adds_lr_and_throughput(tmp_path):
    MetricsLogger(tmp_path).log(1, {"loss": 1.0})
    logger = MetricsLogger(tmp_path, resume=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    logger.log_step(2, {"loss": 0.5}, opt, samples=8, tokens=100.0)
    logger.log_step(3, {"loss": 0.25}, opt, samples=8, tokens=100.0)
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[1]["lr"] == 0.25
    assert lines[2]["samples_per_s"] > 0 and lines[2]["tokens_per_s"] == pytest.approx(lines[2]["samples_per_s"] * 12.5)


def test_scalars_and_groups():
    assert scalars({"a": 1, "b": float("nan"), "c": "x", "step": 4, "d": True}) == {"a": 1.0}
    assert target_group("model.layers.11.mlp.up_proj.weight") == "model.layers.*.mlp.up_proj.weight"


def test_fisher_command_logs_trace_and_group_max_of_a_streamed_parquet(tmp_path):
    """data.streaming / data.columns as YAML keys; the logged summaries against the exported Fisher."""
    import datasets
    from safetensors.torch import load_file

    from fisherdist import cli

    model_dir = build_model_dir(tmp_path)
    datasets.Dataset.from_dict({"body": texts(7)}).to_parquet(str(tmp_path / "d.parquet"))
    cfg = tmp_path / "f.yaml"
    cfg.write_text(f"model: {{path: {model_dir}}}\ndata: {{path: '{tmp_path}/d.parquet', streaming: true, "
                   f"columns: {{text: body}}, max_length: 16, batch_size: 3}}\nfisher: {{params: ['model.layers.*.mlp.*', 'lm_head.weight']}}\n"
                   f"out: {tmp_path / 'out'}\nlog: {{tensorboard: true}}\n")
    assert cli.main(["fisher", str(cfg)]) == 0
    assert cli.main(["export", str(tmp_path / "out"), "--out", str(tmp_path / "f.safetensors")]) == 0
    fisher = load_file(str(tmp_path / "f.safetensors"))
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 3 and row["fisher/samples"] == 7
    assert row["fisher/trace"] == pytest.approx(sum(float(t.double().sum()) for t in fisher.values()), rel=1e-5)
    group = "model.layers.*.mlp.up_proj.weight"
    want = max(float(t.max()) for n, t in fisher.items() if target_group(n) == group)
    assert row[f"fisher/{group}/max"] == pytest.approx(want, rel=1e-6)
    assert _events(tmp_path / "out" / "tensorboard")["fisher/trace"][0][0] == 3


def test_recipes_trainer_writes_one_row_per_step(tmp_path):
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.recipes.train_config import OptimSettings
    from fisherdist.recipes.trainer import StepBatch, Trainer, TrainHook

    torch.manual_seed(0)
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    model = torch.nn.Linear(3, 1).double()
    w = wrap_model(model, "none", optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.1))
    seen: list[float] = []

    class Loss(TrainHook):
        name = "loss"

        def after_step(self, batch: StepBatch, row: dict) -> None:
            row["loss"] = seen[-1]

    def loss(batch: StepBatch) -> torch.Tensor:
        idx = torch.tensor([i for i in batch.mine if i >= 0])
        value = ((model(x[idx]) - y[idx]) ** 2).sum() / batch.n_real
        seen.append(float(value.detach()))
        return value

    settings = OptimSettings(lr=0.1, epochs=1, batch_size=4, seed=1, checkpoint_every=None, checkpoint_minutes=None)
    logger = MetricsLogger(tmp_path)
    Trainer(w, len(x), settings, loss, hooks=[Loss()], metrics=logger).run(progress=False)
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and [r["loss"] for r in lines] == seen
    assert all(r["lr"] > 0 for r in lines) and "samples_per_s" in lines[-1]


def test_pass_logs_trace_and_max_per_group_against_a_float64_oracle(tmp_path):
    """metrics.jsonl of a method's Fisher pass: trace and max per target group = the mean of per-sample squared
    gradients of the mean-token NLL, computed here sample by sample in float64 (ragged lengths)."""
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.recipes.config import FisherPassSettings
    from fisherdist.recipes.fisher_pass import run_passes
    from tests.fisher_oracle import grads_of, tiny_llama

    model = tiny_llama(0)
    patterns = ["model.layers.*.self_attn.q_proj.weight", "model.layers.*.mlp.down_proj.weight"]
    names = [n for n, _ in model.named_parameters() if n.endswith(("q_proj.weight", "down_proj.weight"))]
    rows = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    want: dict[str, torch.Tensor] = {}
    for r in rows:
        ids = torch.tensor([r])
        for n, g in grads_of(model, ids, ids, names).items():
            want[n] = want.get(n, 0) + g.double() ** 2 / len(rows)
    w = wrap_model(model, "none")
    logger = MetricsLogger(tmp_path)
    run_passes(w, {"forbidden": rows}, FisherPassSettings(batch_size=2, max_length=8, dtype="float64"), patterns, 0,
               None, progress=False, metrics=logger)["forbidden"].close()
    logger.close()
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["stage"] == "fisher_forbidden" and row["step"] == 2 and row["fisher/samples"] == 3
    assert row["fisher/trace"] == pytest.approx(sum(float(f.sum()) for f in want.values()), rel=1e-9)
    for group in {target_group(n) for n in names}:
        assert row[f"fisher/{group}/max"] == pytest.approx(max(float(want[n].max()) for n in names
                                                               if target_group(n) == group), rel=1e-9)
