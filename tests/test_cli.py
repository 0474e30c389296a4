"""The ``fisherdist`` command turns user errors into one line ``fisherdist: error: ...`` and exit 2.

The in-process tests drive :func:`fisherdist.cli.main` with a test-only command group
(``tests/_cli_probe.py``), then real registered commands in-process; one real command runs in a fresh
interpreter as a user would (nothing printed while importing may reach stderr).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fisherdist import cli
from tests import _cli_probe

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", [_cli_probe])


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fisherdist: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0].removeprefix("fisherdist: error: ")


def test_user_error_is_one_line_and_status_2(probe: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.yaml"
    assert cli.main(["probe", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and _one_error_line(err) == f"{missing}: config file not found"


def test_bad_value_names_key_and_value(probe: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: many\n")
    assert cli.main(["probe", str(cfg)]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(f"{cfg}: key 'steps': got 'many': ")


def test_valid_run_exits_0(probe: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 1\n")
    assert cli.main(["probe", str(cfg), "steps=4", "name=x"]) == 0
    assert capsys.readouterr() == ("steps=4 name=x\n", "")


def test_bugs_are_not_dressed_up_as_user_errors(probe: None, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["probe", str(tmp_path / "c.yaml"), "--crash"])


def _fisherdist(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "fisherdist", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_real_command_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.yaml"
    assert cli.main(["fisher", str(missing)]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"{missing}: config file not found"


def test_real_command_bad_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("out: x\n")
    assert cli.main(["fisher", str(cfg), "nproc"]) == 2
    assert _one_error_line(capsys.readouterr().err) == "command line: override 'nproc': expected key.path=value"


def test_real_command_unwritable_output() -> None:
    proc = _fisherdist("world", "build", "--out", "/proc/forbidden", "--preset", "test")
    assert proc.returncode == 2
    message = _one_error_line(proc.stderr)
    assert message.startswith("--out /proc/forbidden: cannot create directory")
