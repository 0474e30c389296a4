"""LQ-LoRA's bit allocation: pick one quantization configuration per matrix to minimise the total error
under sum(numel x bits) <= budget x sum(numel), as a 0/1 integer program solved by HiGHS (scipy ``milp``,
an open solver in place of the official code's licensed Gurobi).

COSTS.json is ``{"matrices": [{"name", "numel", "configs": [{"name", "bits_per_param", "error"}]}]}``;
the plan is ``{"assignment": {matrix: config}, "bits_per_param": average, "error": total}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from fisherdist.errors import ConfigError


@dataclass(frozen=True)
class Option:
    name: str
    bits_per_param: float
    error: float


@dataclass(frozen=True)
class Matrix:
    name: str
    numel: int
    configs: tuple[Option, ...]


def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ConfigError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")
    return value


def _number(obj: Any, key: str, where: str, low: float) -> float:
    value = float(_field(obj, key, (int, float), where))
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"{where}.{key}: expected a finite number >= {low}, got {value!r}")
    return value


def _matrix(entry: Any, where: str) -> Matrix:
    name = _field(entry, "name", str, where)
    numel = _field(entry, "numel", int, where)
    if numel < 1:
        raise ConfigError(f"{where}.numel: expected a positive integer, got {numel}")
    configs = _field(entry, "configs", list, where)
    if not configs:
        raise ConfigError(f"{where}.configs: expected at least one configuration")
    opts = tuple(Option(_field(c, "name", str, f"{where}.configs[{j}]"),
                        _number(c, "bits_per_param", f"{where}.configs[{j}]", 0.0),
                        _number(c, "error", f"{where}.configs[{j}]", 0.0)) for j, c in enumerate(configs))
    return Matrix(name, numel, opts)


def parse_costs(obj: Any, source: str) -> list[Matrix]:
    """Validate a COSTS.json object; every problem is one line naming the file and the key."""
    entries = _field(obj, "matrices", list, source)
    if not entries:
        raise ConfigError(f"{source}.matrices: expected at least one matrix")
    matrices = [_matrix(e, f"{source}.matrices[{i}]") for i, e in enumerate(entries)]
    seen: set[str] = set()
    for m in matrices:
        if m.name in seen:
            raise ConfigError(f"{source}.matrices: matrix {m.name!r} appears twice")
        seen.add(m.name)
    return matrices


def load_costs(path: str | Path) -> list[Matrix]:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read a JSON cost table ({e})") from None
    return parse_costs(obj, str(path))


def check_budget(matrices: list[Matrix], budget: float) -> None:
    """Refuse, before solving, a budget that even the cheapest configuration of every matrix exceeds."""
    total = sum(m.numel for m in matrices)
    least = sum(m.numel * min(c.bits_per_param for c in m.configs) for m in matrices) / total
    if not math.isfinite(budget) or budget < least:
        raise ConfigError(f"--budget {budget}: impossible, the cheapest configurations need {least:.6g} bits per "
                          "parameter on average")


def _problem(matrices: list[Matrix], budget: float) -> tuple[np.ndarray, list[LinearConstraint]]:
    """Objective and constraints over the flattened 0/1 variables x[i, c]."""
    total = sum(m.numel for m in matrices)
    cost = np.array([c.error for m in matrices for c in m.configs], dtype=np.float64)
    cost = cost / max(cost.max(), 1e-300)  # scale-free (the argmin is unchanged); HiGHS prefers O(1) costs
    rows = np.repeat(np.arange(len(matrices)), [len(m.configs) for m in matrices])
    one = coo_array((np.ones(rows.size), (rows, np.arange(rows.size))), shape=(len(matrices), rows.size))
    storage = np.array([[m.numel / total * c.bits_per_param for m in matrices for c in m.configs]])
    return cost, [LinearConstraint(one, 1, 1), LinearConstraint(storage, -np.inf, budget)]


def solve(matrices: list[Matrix], budget: float, time_limit: float = 60.0) -> tuple[dict[str, Any], bool]:
    """(plan, proven optimal): exact (``mip_rel_gap=0``) unless the time limit stops HiGHS first, which then
    returns its best feasible plan."""
    check_budget(matrices, budget)
    cost, constraints = _problem(matrices, budget)
    res = milp(cost, integrality=np.ones_like(cost), bounds=Bounds(0, 1), constraints=constraints,
               options={"mip_rel_gap": 0.0, "time_limit": time_limit})
    if res.x is None:
        raise ConfigError(f"--budget {budget}: the solver found no feasible assignment ({res.message})")
    choice, k = {}, 0
    for m in matrices:
        picks = res.x[k:k + len(m.configs)]
        choice[m.name] = m.configs[int(np.argmax(picks))]
        k += len(m.configs)
    total = sum(m.numel for m in matrices)
    return {"assignment": {n: c.name for n, c in choice.items()},
            "bits_per_param": sum(m.numel * choice[m.name].bits_per_param for m in matrices) / total,
            "error": sum(c.error for c in choice.values())}, bool(res.status == 0)
