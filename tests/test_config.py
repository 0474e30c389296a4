"""Config loading: every class of bad input is one ``ConfigError`` line naming the file, key, value and
what was expected; valid ``key=value`` overrides come out with the type YAML gives them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from fisherdist.config import DataConfig, DistConfig, ModelConfig, Section, load_config, parse_overrides
from fisherdist.errors import ConfigError


class Inner(Section):
    b: int = 1
    ratio: float = Field(0.5, ge=0.0, le=1.0)


class Probe(Section):
    name: str
    a: Inner = Field(default_factory=Inner)
    x: bool = False
    p: list[str] = Field(default_factory=list)


class Run(Section):
    data: DataConfig
    model: ModelConfig | None = None
    dist: DistConfig = Field(default_factory=DistConfig)


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(schema: type[Section], path: Path | None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(schema, path, overrides)
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return _write(tmp_path, '{"text": "hello"}\n', "data.jsonl")


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "name: n\na:\n  bb: 2\n")
    assert _error(Probe, cfg) == f"{cfg}: key 'a.bb': unknown key"


def test_wrong_type_names_value_and_expectation(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "name: n\na:\n  b: lots\n")
    msg = _error(Probe, cfg)
    assert msg.startswith(f"{cfg}: key 'a.b': got 'lots': ") and "valid integer" in msg


def test_missing_required_key(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "x: true\n")
    assert _error(Probe, cfg) == f"{cfg}: key 'name': missing required value"


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert _error(Probe, missing) == f"{missing}: config file not found"


def test_missing_model_dir(tmp_path: Path, data_file: Path) -> None:
    model = tmp_path / "no-model"
    msg = _error(Run, None, [f"data.path={data_file}", f"model.path={model}"])
    assert msg.startswith("command line: key 'model.path': got ") and f"expected {model}/config.json" in msg


def test_model_dir_with_config_is_accepted(tmp_path: Path, data_file: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = load_config(Run, None, [f"data.path={data_file}", f"model.path={model}"])
    assert cfg.model is not None and cfg.model.path == str(model)


def test_missing_data_file(tmp_path: Path) -> None:
    cfg = _write(tmp_path, f"data:\n  path: {tmp_path}/absent.jsonl\n")
    msg = _error(Run, cfg)
    assert msg.startswith(f"{cfg}: key 'data.path': got ") and f"no data file at {tmp_path}/absent.jsonl" in msg


@pytest.mark.parametrize(
    "override, key, bound",
    [("data.batch_size=0", "data.batch_size", "greater than 0"), ("dist.nproc=0", "dist.nproc", "greater than or equal to 1")],
)
def test_out_of_range_value(data_file: Path, override: str, key: str, bound: str) -> None:
    msg = _error(Run, None, [f"data.path={data_file}", override])
    assert msg.startswith(f"command line: key '{key}': got 0: ") and bound in msg


def test_out_of_range_float(tmp_path: Path) -> None:
    msg = _error(Probe, _write(tmp_path, "name: n\na: {ratio: 1.5}\n"))
    assert "key 'a.ratio': got 1.5" in msg and "less than or equal to 1" in msg


def test_bad_choice_lists_the_choices(data_file: Path) -> None:
    msg = _error(Run, None, [f"data.path={data_file}", "dist.backend=zero4"])
    assert "key 'dist.backend': got 'zero4'" in msg and "'fsdp2'" in msg


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "name: n\na:\n  b: [1, 2\nx: true\n")
    msg = _error(Probe, cfg)
    assert msg.startswith(f"{cfg}: line ") and "malformed YAML" in msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "- a\n- b\n")
    assert _error(Probe, cfg) == f"{cfg}: expected a mapping of sections at the top level, got list"


@pytest.mark.parametrize("bad", ["foo", "=3", "a..b=1", ".a=1"])
def test_malformed_override(bad: str) -> None:
    assert _error(Probe, None, ["name=n", bad]) == f"command line: override '{bad}': expected key.path=value"


def test_override_into_a_scalar(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "name: n\nx: true\n")
    assert _error(Probe, cfg, ["x.y=1"]) == f"{cfg}: key 'x.y': 'x' is a value, not a section"


def test_override_types() -> None:
    parsed = dict(parse_overrides(["a.b=3", "x=true", "p=[a,b]", "r=0.25", "s=hello", "e=", "n=null"]))
    assert parsed == {"a.b": 3, "x": True, "p": ["a", "b"], "r": 0.25, "s": "hello", "e": "", "n": None}
    assert type(parsed["a.b"]) is int and type(parsed["x"]) is bool and type(parsed["r"]) is float


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "name: from-file\na:\n  b: 1\n  ratio: 0.1\n")
    loaded = load_config(Probe, cfg, ["a.b=3", "x=true", "p=[a,b]", "name=cli"])
    assert loaded == Probe(name="cli", a=Inner(b=3, ratio=0.1), x=True, p=["a", "b"])


def test_cross_key_check_is_one_line_naming_the_keys(data_file: Path) -> None:
    from fisherdist.fisher.cli import FisherRunConfig
    from fisherdist.methods.suv.config import SuvConfig

    common = ["model.path=@world/model", "out=x", "model.load=sharded", "dist.backend=zero2"]
    msg = _error(FisherRunConfig, None, [f"data.path={data_file}", *common])
    assert msg == "command line: model.load=sharded needs dist.backend=fsdp2 or zero3, got zero2"
    msg = _error(SuvConfig, None, [f"data.books={data_file}", f"data.retain={data_file}", *common[:2],
                                   "train.lambda_schedule=adaptive", "train.lam=0"])
    assert msg == "command line: section 'train': lambda_schedule=adaptive needs lam > 0"


def test_float64_under_zero3_is_refused_before_loading(data_file: Path) -> None:
    from fisherdist.fisher.cli import FisherRunConfig
    from fisherdist.methods.suv.config import SuvConfig

    common = ["model.path=@world/model", "out=x", "model.dtype=float64", "dist.backend=zero3"]
    msg = _error(FisherRunConfig, None, [f"data.path={data_file}", *common])
    assert msg.startswith("command line: model.dtype=float64 is not supported by dist.backend=zero3"), msg
    msg = _error(SuvConfig, None, [f"data.books={data_file}", f"data.retain={data_file}", *common])
    assert "model.dtype=float64" in msg and "zero3" in msg, msg
    loaded = load_config(FisherRunConfig, None, [f"data.path={data_file}", *common[:3], "dist.backend=zero2"])
    assert loaded.model.dtype == "float64"  # ZeRO-1/2 keep float64 models
