"""YAML configs with dotted ``key=value`` overrides, validated by pydantic.

Every command owns a pydantic schema (``extra="forbid"`` so a misspelt key is an error, not a silent
default). :func:`load_config` merges the YAML file with command-line overrides and turns any validation
problem into one :class:`ConfigError` line naming the file, the key, the bad value and what was expected.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fisherdist.errors import ConfigError

T = TypeVar("T", bound=BaseModel)

WORLD_PREFIX = "@world/"


def default_world_dir() -> Path:
    """The tiny world shipped inside the package (``fisherdist world build`` reproduces it)."""
    return Path(__file__).resolve().parent / "world" / "default"


def resolve_path(value: str | Path) -> Path:
    """Expand ``@world/...`` to the shipped tiny world and ``~``; other paths are taken as given."""
    text = str(value)
    if text.startswith(WORLD_PREFIX):
        return default_world_dir() / text[len(WORLD_PREFIX) :]
    return Path(text).expanduser()


def _data_ref(value: str) -> str:
    from fisherdist.data.source import check_ref

    return check_ref(value)


DataFile = Annotated[str, AfterValidator(_data_ref)]
"""A data reference (``fisherdist.data.source``): an existing file or dataset directory (``@world/...``
allowed, stored resolved) or a dataset id, with optional ``?split=...&streaming=true&FIELD=COLUMN``."""


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_REF_CHECK = typing.get_args(DataFile)[1]  # the validator that marks a field as a data reference


def _is_ref(annotation: Any, metadata: list[Any]) -> bool:
    """A ``DataFile`` field (possibly optional or a list of them)."""
    if any(m is _REF_CHECK for m in metadata):
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _is_ref(args[0], list(args[1:]))
    return any(_is_ref(a, []) for a in args)


class DataKeys(Section):
    """``split``, ``name``, ``streaming`` and ``columns`` (``FIELD: COLUMN``) as YAML keys beside a section's data
    references, folded into each of them at load time (``myorg/corpus?split=validation&streaming=true&text=body``);
    what a reference says itself wins. Everything downstream reads plain references."""

    split: str | None = Field(None, description="dataset split (default: train); slices like train[:1000] work")
    name: str | None = Field(None, description="the dataset's configuration name (load_dataset's second argument)")
    streaming: bool = Field(False, description="read records lazily, never all in memory")
    columns: dict[str, str] = Field(default_factory=dict, description="FIELD: COLUMN, the column each field reads")

    @model_validator(mode="after")
    def _fold_keys(self) -> DataKeys:
        from fisherdist.data.source import with_keys

        keys = {"split": self.split, "name": self.name, "streaming": "true" if self.streaming else None,
                **self.columns}
        if not any(keys.values()):
            return self
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None or not _is_ref(info.annotation, list(info.metadata)):
                continue
            folded = [with_keys(v, keys) for v in value] if isinstance(value, list) else with_keys(value, keys)
            self.__dict__[name] = folded  # no re-validation: the reference was checked field by field
        return self


class ModelConfig(Section):
    path: str = Field(description="local Hugging Face model directory (or @world/model)")
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    load: Literal["full", "sharded"] = Field(
        "full", description="full: every rank loads the whole model; sharded (FSDP2, ZeRO-3): no rank holds it whole")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        p = resolve_path(v)
        if not (p / "config.json").is_file():
            raise ValueError(f"no Hugging Face model directory at {p} (expected {p}/config.json)")
        return str(p)


class DataConfig(DataKeys):
    path: DataFile = Field(description="a data reference (JSONL, Parquet, Arrow, save_to_disk directory, dataset id)")
    field: str = "text"
    max_length: int = Field(128, gt=0)
    num_samples: int | None = Field(None, gt=0, description="first N records in file order")
    batch_size: int = Field(8, gt=0, description="micro-batch size per rank")
    shuffle: bool = False
    seed: int = 0


def _resume_mode(value: Any) -> Any:
    """``resume: true/false`` (the old boolean) reads as ``auto`` / ``never``."""
    return {True: "auto", False: "never"}.get(value, value) if isinstance(value, bool) else value


ResumeMode = Annotated[Literal["auto", "never", "must"], BeforeValidator(_resume_mode)]
"""auto: continue a compatible state, refuse an incompatible one; never: start over (the old state is
replaced only by a complete new one); must: fail when there is nothing to continue."""

Backend = Literal["none", "ddp", "fsdp1", "fsdp2", "zero1", "zero2", "zero3"]


class DistConfig(Section):
    backend: Backend = "none"
    nproc: int = Field(1, ge=1, description="processes to spawn locally when not launched by a launcher")
    timeout_s: float | None = Field(None, gt=0, description="seconds a rank waits for missing peers (start-up and "
                                    "collectives) before failing with their names; default FISHERDIST_DIST_TIMEOUT_S or 600")


def check_model_backend(model: ModelConfig, dist: DistConfig) -> None:
    """Model settings the backend cannot honour, refused before anything loads.

    ``model.load=sharded`` loads into FSDP2 row shards or ZeRO-3 partitions, so it needs one of those.
    DeepSpeed's ``zero.Init`` (ZeRO-3) accepts only half, bfloat16 and float32 parameters; on CPUs without
    fp16 support it silently ignores the model's dtype, elsewhere it asserts, so float64 is refused here.
    """
    if model.load == "sharded" and dist.backend not in ("fsdp2", "zero3"):
        raise ValueError(f"model.load=sharded needs dist.backend=fsdp2 or zero3, got {dist.backend}")
    if model.dtype == "float64" and dist.backend == "zero3":
        raise ValueError("model.dtype=float64 is not supported by dist.backend=zero3 (DeepSpeed ZeRO-3 partitions "
                         "float32, bfloat16 or float16 parameters); use model.dtype=float32")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: key '{dotted}': '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``a.b=1`` -> ``("a.b", 1)``; values are parsed as YAML scalars so types come out right."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"command line: override '{item}': expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"key '{key}': unknown key"
    if kind == "missing":
        return f"key '{key}': missing required value"
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(err.get("input"), dict):  # a check across keys (a model validator): its message names them
        return msg if key == "<root>" else f"section '{key}': {msg}"
    return f"key '{key}': got {err.get('input')!r}: {msg}"


def load_config(schema: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load ``path`` (YAML mapping), apply dotted overrides, validate against ``schema``."""
    source = str(path) if path is not None else "command line"
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        tree = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, source)
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        first = e.errors()[0]
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{source}: {_describe(first)}{more}") from None


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML, saved next to every run's outputs."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
