"""``per_method`` in a VILA / FILA recipe: one file carries each method's tuned train: keys, ``method=fila``
on the command line picks FILA's, an explicit train: key (file or command line) wins, a saved run config
reloads to the same settings, and a misspelt key is one error line before any compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fisherdist.config import dump_config, load_config
from fisherdist.errors import ConfigError
from fisherdist.methods.vila.config import VilaConfig

TINY = Path(__file__).resolve().parents[1] / "configs" / "vila" / "tiny.yaml"


def _recipe(tmp_path: Path, per_method: dict, train: dict) -> Path:
    tree = yaml.safe_load(TINY.read_text())
    tree["train"] = {"loss": "ihl", "epochs": 5, **train}
    tree["per_method"] = per_method
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(("overrides", "lr", "rw"), [
    ([], 2e-5, 2.0), (["method=fila"], 3e-4, 1.0), (["method=fila", "train.lr=1e-3"], 1e-3, 1.0),
    (["train.retain_weight=5"], 2e-5, 5.0)])
def test_per_method_fills_unset_train_keys(tmp_path, overrides, lr, rw):
    path = _recipe(tmp_path, {"vila": {"lr": 2e-5, "retain_weight": 2}, "fila": {"lr": 3e-4}}, {})
    cfg = load_config(VilaConfig, path, overrides)
    assert (cfg.train.lr, cfg.train.retain_weight, cfg.train.loss) == (lr, rw, "ihl")
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(VilaConfig, saved) == cfg


def test_a_train_key_in_the_file_wins(tmp_path):
    path = _recipe(tmp_path, {"fila": {"lr": 3e-4}}, {"lr": 5e-5})
    assert load_config(VilaConfig, path, ["method=fila"]).train.lr == 5e-5


def test_unknown_per_method_key_is_one_line(tmp_path):
    path = _recipe(tmp_path, {"fila": {"lrr": 3e-4}}, {})
    with pytest.raises(ConfigError) as err:
        load_config(VilaConfig, path)  # not the chosen method: still checked
    assert str(err.value) == f"{path}: per_method.fila: ['lrr'] are not keys of train:"


def test_shipped_tiny_recipe_tunes_lr_per_method():
    tree = yaml.safe_load(TINY.read_text())
    assert "lr" not in tree["train"]  # else it would win over every method's own
    for method, keys in tree["per_method"].items():
        cfg = load_config(VilaConfig, TINY, [f"method={method}"])
        assert {k: getattr(cfg.train, k) for k in keys} == keys
