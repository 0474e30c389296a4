"""RunCheckpointer: atomic saves, keep-last-K, interrupted saves, errors that name the file, resharding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fisherdist.distributed.checkpoint import ModelOptimizerState, RunCheckpointer, step_seed
from fisherdist.errors import CheckpointError
from tests._toy_train import SquaredGradSum, batch, build, full
from tests.distributed import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _states(backend: str = "plain") -> tuple[dict, torch.nn.Module]:
    model, opt = build(backend)
    return {"train": ModelOptimizerState(model, opt), "fisher": SquaredGradSum(model), "progress": {"step": 0}}, model


def _train(states: dict, model: torch.nn.Module, steps: range, rank: int = 0, world: int = 1) -> None:
    opt = states["train"].optimizer
    for step in steps:
        x, y = batch(1, step, rank, world)
        (((model(x) - y) ** 2).sum() * world / 12).backward()
        states["fisher"].add(model, 12)
        opt.step()
        opt.zero_grad()


def _snapshot(states: dict) -> dict[str, torch.Tensor]:
    flat = {f"w.{k}": full(v) for k, v in states["train"].state_dict()["model"].items()}
    flat |= {f"m.{k}": full(v["momentum_buffer"]) for k, v in states["train"].state_dict()["optim"]["state"].items()}
    return flat | {f"f.{k}": full(v) for k, v in states["fisher"].sums.items()}


def test_save_load_roundtrip_keep_last_and_atomic(tmp_path: Path) -> None:
    states, model = _states()
    ckpt = RunCheckpointer(tmp_path, keep_last=2)
    assert ckpt.latest() is None
    for step in (1, 2, 3):
        _train(states, model, range(step - 1, step))
        states["progress"]["step"] = step
        ckpt.save(step, states, backend="none", config_text="a: 1")
    assert [s for s, _ in ckpt.checkpoints()] == [2, 3]  # keep-last-2
    assert not list(tmp_path.glob(".tmp-*"))
    ckpt.save(3, states)  # re-saving a step (a resumed run preempted again before its next step) swaps it in place
    assert [s for s, _ in ckpt.checkpoints()] == [2, 3] and not list(tmp_path.glob(".old-*"))
    expected = _snapshot(states)
    fresh, _ = _states()
    meta = RunCheckpointer(tmp_path).load(fresh)
    assert meta["step"] == 3 and meta["world_size"] == 1 and fresh["progress"]["step"] == 3
    got = _snapshot(fresh)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    states, model = _states()
    ckpt = RunCheckpointer(tmp_path, keep_last=1)
    ckpt.save(1, states)
    before = _snapshot(states)
    _train(states, model, range(1, 2))
    import torch.distributed.checkpoint as dcp

    def dying_save(state_dict: dict, checkpoint_id: str) -> None:  # writes part of the files, then "crashes"
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, states)
    assert (tmp_path / ".tmp-step-2").is_dir() and ckpt.latest() == tmp_path / "step-1"
    fresh, _ = _states()
    RunCheckpointer(tmp_path).load(fresh)
    for key, value in before.items():
        torch.testing.assert_close(_snapshot(fresh)[key], value, rtol=0, atol=0)
    monkeypatch.undo()
    ckpt.save(2, states)  # the next good save clears the leftover and replaces step-1 (keep_last=1)
    assert [s for s, _ in ckpt.checkpoints()] == [2] and not list(tmp_path.glob(".tmp-*"))


def _saved(tmp_path: Path) -> Path:
    states, model = _states()
    _train(states, model, range(2))
    return RunCheckpointer(tmp_path).save(2, states)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: (p / "__0_0.distcp").write_bytes((p / "__0_0.distcp").read_bytes()[:100]), r"__0_0\.distcp: truncated"),
        (lambda p: (p / "__0_0.distcp").unlink(), r"__0_0\.distcp: shard file missing"),
        (lambda p: (p / ".metadata").unlink(), r"\.metadata: missing"),
        (lambda p: (p / ".metadata").write_bytes(b"garbage"), r"\.metadata: unreadable"),
        (lambda p: _flip_last_byte(p / "__0_0.distcp"), r"__0_0\.distcp: corrupted"),
    ],
    ids=["truncated", "missing-shard", "missing-metadata", "bad-metadata", "flipped-byte"],
)
def test_damaged_checkpoint_errors_name_the_file(tmp_path: Path, damage, expected: str) -> None:
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=expected) as info:
        RunCheckpointer(tmp_path).load(_states()[0], path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_shape_and_name_mismatch(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.Tanh(), torch.nn.Linear(11, 3)).double()
    with pytest.raises(CheckpointError, match=r"\.metadata: train\.model\.0\.weight has shape \(10, 6\) in the checkpoint, the model has \(11, 6\)"):
        RunCheckpointer(tmp_path).load({"train": ModelOptimizerState(other)}, path)
    renamed = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Identity(), torch.nn.Linear(10, 3)).double()
    with pytest.raises(CheckpointError, match=r"\.metadata: parameter names do not match the model \(missing train\.model\.3\.bias"):
        RunCheckpointer(tmp_path).load({"train": ModelOptimizerState(renamed)}, path)


def test_step_seed_depends_on_seed_step_rank_only() -> None:
    seeds = {step_seed(s, t, r) for s in range(3) for t in range(50) for r in range(4)}
    assert len(seeds) == 3 * 50 * 4 and step_seed(1, 7, 2) == step_seed(1, 7, 2)


def _save_sharded(rank: int, world: int, d: str) -> dict[str, torch.Tensor]:
    states, model = _states("fsdp2")
    _train(states, model, range(3), rank, world)
    states["progress"]["step"] = 3
    RunCheckpointer(d).save(3, states, backend="fsdp2")
    return _snapshot(states)


def _load_sharded(rank: int, world: int, d: str, backend: str = "fsdp2") -> tuple[dict[str, torch.Tensor], int, list[int]]:
    states, _ = _states(backend)
    RunCheckpointer(d).load(states)
    local_rows = [getattr(p, "to_local", lambda p=p: p)().shape[0] for p in states["train"].model.parameters()]
    return _snapshot(states), states["progress"]["step"], local_rows


@pytest.mark.timeout(180)
def test_save_on_2_load_on_1_and_3(tmp_path: Path) -> None:
    """FSDP2 shards saved by 2 ranks: loaded by 3 FSDP2 ranks (uneven shards) and by 1 plain process."""
    saved = run_distributed(_save_sharded, 2, str(tmp_path), timeout=120)[0]
    three = run_distributed(_load_sharded, 3, str(tmp_path), timeout=120)
    assert [rows[0] for _, _, rows in three] == [4, 4, 2]  # the 10-row layer is really resharded
    one = _load_sharded(0, 1, str(tmp_path), backend="plain")
    assert not dist.is_initialized() and one[2][0] == 10
    for world, (snap, step, _) in [(3, r) for r in three] + [(1, one)]:
        assert step == 3
        for key, value in saved.items():
            torch.testing.assert_close(snap[key], value, rtol=0, atol=0, msg=f"{key} on {world} ranks")
    # explicit offline reshard of the same 2-rank checkpoint + consolidated HF export, via the CLI
    from safetensors.torch import load_file

    from fisherdist.cli import main as cli_main

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "toy"}')
    dst, hf = tmp_path / "resharded", tmp_path / "hf"
    assert cli_main(["reshard", str(tmp_path), str(dst), "--export-hf", str(hf), "--base", str(base)]) == 0
    assert sorted(p.name for p in (dst / "step-3").iterdir() if p.suffix == ".distcp") == ["__0_0.distcp"]
    snap, step, _ = _load_sharded(0, 1, str(dst), backend="plain")
    assert step == 3 and all(torch.equal(snap[k], v) for k, v in saved.items())
    exported = load_file(str(hf / "model.safetensors"))
    assert exported.keys() == {k[2:] for k in saved if k.startswith("w.")} and (hf / "config.json").is_file()
    assert all(torch.equal(exported[k[2:]], v) for k, v in saved.items() if k.startswith("w."))


def test_export_hf_writes_peft_adapter_for_lora_weights(tmp_path: Path) -> None:
    """A PEFT model's FQNs (``...lora_A.default.weight``) become PEFT's file keys (no adapter name)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from fisherdist.distributed.cli import export_hf

    a, b, w = torch.randn(2, 6), torch.randn(6, 2), torch.randn(6, 6)
    prefix = "base_model.model.layers.0.q_proj"
    model = {f"{prefix}.lora_A.default.weight": a, f"{prefix}.lora_B.default.weight": b, f"{prefix}.base_layer.weight": w}
    dcp.save({"train": {"model": model}}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    path = export_hf(tmp_path / "ck", tmp_path / "hf")
    exported = load_file(str(path))
    assert path.name == "adapter_model.safetensors" and set(exported) == {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"}
    assert torch.equal(exported[f"{prefix}.lora_A.weight"], a) and torch.equal(exported[f"{prefix}.lora_B.weight"], b)


def test_export_hf_keeps_a_rewritten_base_beside_the_adapter(tmp_path: Path) -> None:
    """Base weights and LoRA factors in one checkpoint (a method that rewrote W - s*B0*A0): the base as trained
    under its HF names, the adapter in PEFT's, and with --lora-scale the merged W + s*B*A (float64 here)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from fisherdist.cli import main as cli_main

    a, b, w, e = torch.randn(2, 6), torch.randn(6, 2), torch.randn(6, 6), torch.randn(9, 6)
    prefix = "base_model.model.layers.0.q_proj"
    model = {f"{prefix}.lora_A.default.weight": a, f"{prefix}.lora_B.default.weight": b,
             f"{prefix}.base_layer.weight": w, "base_model.model.embed.weight": e}
    dcp.save({"train": {"model": model}}, checkpoint_id=str(tmp_path / "ck" / "step-1"), no_dist=True)
    base = tmp_path / "orig"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "toy"}')
    hf = tmp_path / "hf"
    assert cli_main(["reshard", str(tmp_path / "ck" / "step-1"), str(tmp_path / "re"), "--export-hf", str(hf),
                     "--base", str(base), "--lora-scale", "2.0"]) == 0
    full, adapter = load_file(str(hf / "model.safetensors")), load_file(str(hf / "adapter_model.safetensors"))
    assert set(full) == {"layers.0.q_proj.weight", "embed.weight"} and torch.equal(full["layers.0.q_proj.weight"], w)
    assert set(adapter) == {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"}
    merged = load_file(str(hf / "merged" / "model.safetensors"))
    want = w.double() + 2.0 * (b.double() @ a.double())
    torch.testing.assert_close(merged["layers.0.q_proj.weight"].double(), want, rtol=0, atol=1e-6)
    assert torch.equal(merged["embed.weight"], e) and (hf / "merged" / "config.json").is_file()
