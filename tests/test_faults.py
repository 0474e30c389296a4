"""The fault table: every bad input and damaged state fails fast with one line, exit 2, and touches nothing.

Each case prepares a fault (a config override, a damaged file, an unwritable path), runs the real CLI's
``main(argv)`` in this process and asserts: exit status 2, stderr is exactly one ``fisherdist: error:``
line naming the problem (no traceback), it took seconds, and the checksum of every file under the world
(model, data, the finished Fisher run, the run checkpoint) is what it was before. Signals, launchers and
missing peers need real processes: they live in ``tests/test_fault_launch.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fisherdist.cli import main
from tests.tiny_hf import build_model_dir, texts, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SUV_TINY, EVAL_TINY = ROOT / "configs" / "suv" / "tiny.yaml", ROOT / "configs" / "eval" / "memorization_tiny.yaml"
SFT_TINY = ROOT / "configs" / "sft" / "tiny.yaml"
FAIL_WITHIN_S = 20.0


@dataclass
class World:
    root: Path
    model: Path
    data: Path
    cfg: Path
    run: Path  # a finished `fisherdist fisher` output
    ckpt: Path  # a run checkpoint step-N directory

    def copy(self, name: str, dst: Path) -> Path:
        """A private copy of a model / run directory for a case that damages it."""
        shutil.copytree(getattr(self, name), dst, symlinks=True)
        return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from fisherdist.distributed.checkpoint import RunCheckpointer

    root = tmp_path_factory.mktemp("faults")
    model, data = build_model_dir(root), write_jsonl(root / "train.jsonl", texts(12))
    cfg = root / "fisher.yaml"
    cfg.write_text(f"model: {{path: {model}}}\ndata: {{path: {data}, max_length: 16, batch_size: 3}}\n"
                   f"fisher: {{params: ['model.layers.1.*']}}\nout: {root / 'run'}\n")
    assert main(["fisher", str(cfg)]) == 0
    ckpt = RunCheckpointer(root / "ckpts").save(3, {"model": {"w": torch.arange(64.0)}, "progress": {"step": 3}})
    return World(root, model, data, cfg, root / "run", ckpt)


def _flip(path: Path, at: float = 0.5, n: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    start = int(len(raw) * at)
    for i in range(start, min(start + n, len(raw))):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _shard(run: Path) -> Path:
    return next((run / "fisher").glob("*.distcp"))


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


# ---- the table: (id, argv builder, what the one line must name) --------------------------------------
Build = Callable[[World, Path], list[str]]


def fisher(*overrides: str) -> Build:
    return lambda w, t: ["fisher", str(w.cfg), f"out={t / 'out'}", *overrides]


def fisher_with(prepare: Callable[[World, Path], list[str]]) -> Build:
    return lambda w, t: ["fisher", str(w.cfg), f"out={t / 'out'}", *prepare(w, t)]


def _data(content: bytes) -> Callable[[World, Path], list[str]]:
    def prepare(w: World, t: Path) -> list[str]:
        (t / "bad.jsonl").write_bytes(content)
        return [f"data.path={t / 'bad.jsonl'}"]

    return prepare


def _model(damage: Callable[[Path], None]) -> Callable[[World, Path], list[str]]:
    def prepare(w: World, t: Path) -> list[str]:
        damage(w.copy("model", t / "model"))
        return [f"model.path={t / 'model'}"]

    return prepare


def _resumed_run(damage: Callable[[Path], None], *overrides: str) -> Build:
    """``fisherdist fisher`` into a copy of the finished run, damaged first (it would resume it)."""
    def build(w: World, t: Path) -> list[str]:
        run = w.copy("run", t / "out")
        damage(run)
        return ["fisher", str(w.cfg), f"out={run}", *overrides]

    return build


def _export(damage: Callable[[Path], None]) -> Build:
    def build(w: World, t: Path) -> list[str]:
        run = w.copy("run", t / "out")
        damage(run)
        return ["export", str(run), "--out", str(t / "f.safetensors")]

    return build


def _corrupt_index(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _data_edited_after_run(w: World, t: Path) -> list[str]:
    """A finished run over ``t/d.jsonl``, then the file is edited under the same name."""
    data = write_jsonl(t / "d.jsonl", texts(6))
    assert main(["fisher", str(w.cfg), f"out={t / 'out'}", f"data.path={data}"]) == 0
    data.write_text(data.read_text().replace("cat", "dog"))
    return [f"data.path={data}"]


def _suv(*overrides: str) -> Build:
    return lambda w, t: ["suv", "mine", str(SUV_TINY), f"out={t / 'out'}", f"model.path={w.model}", *overrides]


def _sft(*overrides: str) -> Build:
    return lambda w, t: ["sft", str(SFT_TINY), f"out={t / 'out'}", f"model.path={w.model}", *overrides]


def _eval(*overrides: str) -> Build:
    return lambda w, t: ["eval", "memorization", str(EVAL_TINY), f"out={t / 'out'}", f"model.path={w.model}", *overrides]


def _reshard(src: Callable[[World, Path], Path], dst: Callable[[World, Path], str]) -> Build:
    return lambda w, t: ["reshard", str(src(w, t)), dst(w, t)]


def _ckpt_copy(damage: Callable[[Path], None]) -> Callable[[World, Path], Path]:
    def src(w: World, t: Path) -> Path:
        step = w.copy("ckpt", t / "src" / w.ckpt.name)
        damage(step)
        return step

    return src


def _blocker(t: Path) -> Path:
    (t / "blocker").write_text("a file where a directory is needed\n")
    return t / "blocker"


def _foreign_out(w: World, t: Path) -> list[str]:
    (t / "out").mkdir()
    (t / "out" / "config.yaml").write_text("memorization: {prefix_len: 4}\nout: x\n")
    return []


def _our_model_bit_flip(w: World, t: Path) -> list[str]:
    """A model directory we wrote (manifest inside), one byte flipped where no header or size check looks."""
    from fisherdist.atomic import atomic_dir

    with atomic_dir(t / "ours") as tmp:
        for f in w.model.iterdir():
            shutil.copy2(f, tmp / f.name)
    _flip(t / "ours" / "model.safetensors", 0.9, 1)
    return [f"model.path={t / 'ours'}"]


BAD_BOOKS = b'{"book": "x", "text": "\xff"}\n'


def _with_file(command: Callable[..., Build], key: str, content: bytes) -> Build:
    """``command`` with ``key`` pointing to a file holding ``content``."""
    def build(w: World, t: Path) -> list[str]:
        (t / "b.jsonl").write_bytes(content)
        return command(f"{key}={t / 'b.jsonl'}")(w, t)

    return build


CASES: list[tuple[str, Build, str]] = [
    # configs
    ("config-missing", lambda w, t: ["fisher", str(t / "nope.yaml")], "config file not found"),
    ("config-malformed-yaml", lambda w, t: ["fisher", str(_write(t / "c.yaml", "model: [path\n"))], "malformed YAML"),
    ("config-unknown-key", fisher("fisher.estimatr=true"), "fisher.estimatr"),
    ("config-bad-value", fisher("data.max_length=0"), "data.max_length"),
    ("config-model-path-missing", fisher("model.path=/nonexistent/model"), "/nonexistent/model"),
    ("config-data-path-missing", fisher("data.path=/nonexistent/x.jsonl"), "/nonexistent/x.jsonl"),
    ("config-resume-value", fisher("resume=maybe"), "resume"),
    ("config-sharded-needs-fsdp2", fisher("model.load=sharded"), "model.load=sharded"),
    ("config-resume-must-no-state", fisher("resume=must"), "resume=must"),
    ("config-fisher-decay", fisher("fisher.decay=0.5"), "fisher.decay"),
    # data
    ("data-invalid-utf8", fisher_with(_data(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')), "bad.jsonl:2: not valid UTF-8"),
    ("data-truncated-json", fisher_with(_data(b'{"text": "the cat"}\n{"text": "the c')), "bad.jsonl:2: not valid JSON"),
    ("data-wrong-type", fisher_with(_data(b'{"text": 7}\n')), "missing string field 'text'"),
    ("data-empty", fisher_with(_data(b"")), "no records"),
    ("data-not-an-object", fisher_with(_data(b'["the cat"]\n')), "expected a JSON object"),
    ("data-missing-field", fisher("data.field=body"), "missing string field 'body'"),
    ("data-empty-string", fisher_with(_data(b'{"text": ""}\n')), "field 'text' is empty"),
    # model directories
    ("model-truncated-weights", fisher_with(_model(lambda d: _truncate(d / "model.safetensors"))), "model.safetensors: truncated"),
    ("model-missing-weights", fisher_with(_model(lambda d: (d / "model.safetensors").unlink())), "no model weights"),
    ("model-garbage-header", fisher_with(_model(lambda d: _flip(d / "model.safetensors", 0.0, 16))), "model.safetensors"),
    ("model-index-missing-shard", fisher_with(_model(_corrupt_index)), "model-00002-of-00002.safetensors: missing"),
    ("model-bad-config-json", fisher_with(_model(lambda d: (d / "config.json").write_text("{"))), "config.json"),
    ("model-ours-flipped-byte", fisher_with(_our_model_bit_flip), "model.safetensors: corrupted"),
    ("model-no-tokenizer", fisher_with(_model(lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")])), "tokenizer"),
    # states
    ("state-flipped-bytes-resume", _resumed_run(lambda r: _flip(_shard(r))), "corrupted"),
    ("state-flipped-bytes-export", _export(lambda r: _flip(_shard(r))), "corrupted"),
    ("state-truncated-shard", _resumed_run(lambda r: _truncate(_shard(r))), "truncated or replaced"),
    ("state-missing-shard", _export(lambda r: _shard(r).unlink()), "missing"),
    ("state-garbage-manifest", _resumed_run(lambda r: (r / "fisher" / "MANIFEST.json").write_text("{")), "unreadable manifest"),
    ("state-other-max-length", _resumed_run(lambda r: None, "data.max_length=8"), "data.max_length=16"),
    ("state-other-estimator", _resumed_run(lambda r: None, "fisher.estimator=centered"), "fisher.estimator='empirical'"),
    ("state-other-targets", _resumed_run(lambda r: None, "fisher.params=[lm_head.weight]"), "fisher.params"),
    ("state-data-edited", fisher_with(_data_edited_after_run), "data.sha256"),
    ("state-foreign-run", fisher_with(_foreign_out), "holds a run of another command"),
    ("export-not-a-state", lambda w, t: ["export", str(w.model), "--out", str(t / "f.safetensors")], "not a Fisher checkpoint"),
    # environments: unwritable or impossible outputs
    ("env-out-unwritable", fisher("out=/proc/fisherdist-out"), "not writable"),
    ("env-out-under-a-file", lambda w, t: ["fisher", str(w.cfg), f"out={_blocker(t) / 'out'}"], "is a file"),
    ("env-out-is-a-file", lambda w, t: ["fisher", str(w.cfg), f"out={_blocker(t)}"], "not a directory"),
    ("env-export-unwritable", lambda w, t: ["export", str(w.run), "--out", "/proc/fisherdist.safetensors"], "--out"),
    ("env-export-to-a-dir", lambda w, t: ["export", str(w.run), "--out", str(t)], "is a directory"),
    # reshard
    ("reshard-src-missing", _reshard(lambda w, t: t / "none", lambda w, t: str(t / "dst")), "neither a DCP checkpoint"),
    ("reshard-dst-unwritable", _reshard(lambda w, t: w.ckpt, lambda w, t: "/proc/fisherdist-dst"), "DST"),
    ("reshard-flipped-bytes", _reshard(_ckpt_copy(lambda s: _flip(next(s.glob("*.distcp")), 0.9, 8)), lambda w, t: str(t / "dst")), "corrupted"),
    ("reshard-truncated-shard", _reshard(_ckpt_copy(lambda s: _truncate(next(s.glob("*.distcp")))), lambda w, t: str(t / "dst")), "truncated"),
    # eval
    ("eval-books-invalid-utf8", _with_file(_eval, "data.books", BAD_BOOKS), "b.jsonl:1: not valid UTF-8"),
    ("eval-after-missing", _eval("after.path=/nonexistent/after"), "/nonexistent/after"),
    ("eval-model-truncated", lambda w, t: _eval(f"model.path={_damaged_model(w, t)}")(w, t), "truncated"),
    ("eval-out-unwritable", _eval("out=/proc/fisherdist-eval"), "not writable"),
    # suv
    ("suv-unmeetable-min-lcs", _suv("mine.min_lcs=40", "mine.continuation_len=32"), "mine.min_lcs=40 can never be met"),
    ("suv-books-wrong-type", _with_file(_suv, "data.books", b'{"book": 1, "text": "a"}\n'), "missing string field 'book'"),
    ("suv-out-unwritable", _suv("out=/proc/fisherdist-suv"), "not writable"),
    ("sft-out-under-a-file", lambda w, t: _sft(f"out={_blocker(t) / 'out'}")(w, t), "is a file"),
    ("sft-data-truncated-json", _with_file(_sft, "data.train", b'{"question": "a", "answer": "b"}\n{"question": "a'), "b.jsonl:2: not valid JSON"),
    ("sft-resume-value", _sft("train.resume=sometimes"), "train.resume"),
    ("suv-prefs-without-mined", lambda w, t: ["suv", "prefs", str(SUV_TINY), f"out={t / 'out'}", f"model.path={w.model}"], "mined.jsonl"),
]


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _damaged_model(w: World, t: Path) -> Path:
    d = w.copy("model", t / "model")
    _truncate(d / "model.safetensors", 0.9)
    return d


@pytest.mark.parametrize("build,needle", [pytest.param(b, n, id=i) for i, b, n in CASES])
def test_fault_fails_fast_with_one_line(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        build: Build, needle: str) -> None:
    argv = build(world, tmp_path)
    had_config = (tmp_path / "out" / "config.yaml").exists()
    capsys.readouterr()
    before = _checksums(world.root), _checksums(tmp_path)
    start = time.perf_counter()
    code = main(argv)
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fisherdist: error: "), err
    assert needle in lines[0] and "Traceback" not in err
    assert took < FAIL_WITHIN_S, f"took {took:.1f} s to fail"
    assert (_checksums(world.root), _checksums(tmp_path)) == before  # nothing existing was changed, damaged or not
    assert (tmp_path / "out" / "config.yaml").exists() == had_config  # a failed run leaves no new config.yaml


def _counts(run: Path) -> float:
    return float(json.loads((run / "summary.json").read_text())["counts"]["samples"])


def test_resume_modes(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """auto adds to a compatible state; never replaces it only with a complete new one; old booleans still read."""
    from fisherdist.fisher import estimate_run

    run = tmp_path / "out"
    argv = ["fisher", str(world.cfg), f"out={run}"]
    assert main([*argv, "data.num_samples=6"]) == 0 and _counts(run) == 6
    assert main([*argv, "resume=true"]) == 0 and _counts(run) == 12  # auto: the other 6 records on top
    state = _checksums(run / "fisher")

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(estimate_run, "fisher_step", boom)
    assert main([*argv, "resume=false", "checkpoint_every=1"]) == 130  # never, interrupted at its first step
    assert _checksums(run / "fisher") == state  # the old state is still the one there
    monkeypatch.undo()
    assert main([*argv, "resume=never"]) == 0 and _counts(run) == 12
    assert main([*argv, "resume=must", "data.num_samples=100"]) == 0 and _counts(run) == 12  # nothing left to add
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "num_samples=100 but the file has 12 records" in warnings[0]


def test_exported_files_are_0644(world: World, tmp_path: Path) -> None:
    assert main(["export", str(world.run), "--out", str(tmp_path / "f.safetensors")]) == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "f.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # 0644 under the usual umask
