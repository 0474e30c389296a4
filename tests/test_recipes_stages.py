"""The stage registry: stages run in registration order (``run`` = all), each sees the same context and
the objects earlier ones left in ``state``, timings are written, and an unknown stage is one error line."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from fisherdist.errors import FisherdistError
from fisherdist.recipes.config import RunConfig
from fisherdist.recipes.stages import ALL, RunContext, StageRegistry


def _ctx(tmp_path: Path) -> RunContext[RunConfig]:
    cfg = RunConfig(model={"path": "@world/model"}, out=str(tmp_path))
    return RunContext(cfg, types.SimpleNamespace(rank=0, world_size=1), tokenizer=None)


def test_stages_run_in_order_and_share_state(tmp_path: Path) -> None:
    seen: list[str] = []

    def first(r: RunContext[RunConfig]) -> None:
        """Stage one."""
        seen.append("first")
        r.state["handed"] = 41

    def second(r: RunContext[RunConfig]) -> None:
        """Stage two: reads what stage one left."""
        seen.append(f"second:{r.state.get('handed')}")

    reg = StageRegistry("toy", [("first", first), ("second", second)])
    ctx = _ctx(tmp_path)
    assert reg.names == ["first", "second"] and reg.help("second") == "Stage two: reads what stage one left."
    timings = reg.run(ctx, [ALL])
    assert seen == ["first", "second:41"] and list(timings) == ["first", "second"]
    assert json.loads((tmp_path / "timings.json").read_text()) == timings
    seen.clear()
    reg.run(_ctx(tmp_path), ["second"])  # a stage alone: a fresh context has nothing in state
    assert seen == ["second:None"]
    with pytest.raises(FisherdistError, match="toy: unknown stage 'third' \\(expected one of first, second, run\\)"):
        reg.run(ctx, ["first", "third"])
    assert seen == ["second:None"]  # nothing ran: names are checked before the first stage starts
