"""A step-time table: measured seconds on a (new tokens, KV tokens) grid, interpolated.

File format (JSON, written by ``benchmarks/profile_step_times.py``)::

    {"provenance": {"gpu": ..., "torch": ..., "model": ..., "dtype": ..., "date": ..., "script": ...},
     "tokens": [1, 16, 256, ...],          # new tokens in the step (ascending)
     "kv_tokens": [0, 1024, 16384, ...],   # KV tokens read by attention (ascending)
     "seconds": [[...], ...]}              # seconds[i][j] at tokens[i], kv_tokens[j]

A step's time is the bilinear interpolation at (``num_tokens``, ``kv_tokens``),
extended linearly past the grid's edges (from the last two points of each axis),
never below zero. Measured tables ship in ``sim/cost/data`` and load by name
(``table:h200-llama-3-8b``; ``TableCost.bundled()`` lists them). The table does not see how tokens split into sequences beyond
these two sums (the grid measures one sequence per point).
"""

from __future__ import annotations

import bisect
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from sagellm_kv_cache.errors import KVConfigError

from .base import BatchStats, StepCostModel

__all__ = ["TableCost"]

_BUNDLED = Path(__file__).with_name("data")
_GRID = ("tokens", "kv_tokens", "seconds")  # a table file's keys besides its provenance


def _axis(name: str, xs) -> list[float]:
    if (
        not isinstance(xs, list)
        or len(xs) < 2
        or any(isinstance(x, bool) or not isinstance(x, int | float) for x in xs)
    ):
        raise KVConfigError(f"table {name} must be a list of >= 2 numbers")
    if any(b <= a for a, b in itertools.pairwise(xs)):
        raise KVConfigError(f"table {name} must be strictly ascending")
    return [float(x) for x in xs]


def _bracket(xs: list[float], x: float) -> tuple[int, float]:
    """Index i and weight w with x = (1-w) xs[i] + w xs[i+1] (w outside [0,1] past the edges)."""
    i = bisect.bisect_right(xs, x) - 1
    i = min(max(i, 0), len(xs) - 2)
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


@dataclass(frozen=True)
class TableCost(StepCostModel):
    tokens: list
    kv_tokens: list
    seconds: list
    provenance: dict = field(default_factory=dict)
    name: str = field(default="table", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", _axis("tokens", self.tokens))
        object.__setattr__(self, "kv_tokens", _axis("kv_tokens", self.kv_tokens))
        s = self.seconds
        if (
            not isinstance(s, list)
            or len(s) != len(self.tokens)
            or any(not isinstance(r, list) or len(r) != len(self.kv_tokens) for r in s)
        ):
            raise KVConfigError("table seconds must be len(tokens) rows of len(kv_tokens) numbers")
        if any(
            isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0
            for r in s
            for v in r
        ):
            raise KVConfigError("table seconds must be numbers >= 0")

    @classmethod
    def bundled(cls) -> list[str]:
        """Names of the measured tables shipped with the package (``sim/cost/data``)."""
        return sorted(p.stem for p in _BUNDLED.glob("*.json"))

    @classmethod
    def load(cls, path: str | Path) -> TableCost:
        """A table from a JSON file, or a bundled table by name (``h200-llama-3-8b``)."""
        if not Path(path).exists() and (_BUNDLED / f"{path}.json").is_file():
            path = _BUNDLED / f"{path}.json"
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise KVConfigError(f"cannot read step-time table {path}: {err}") from None
        if not isinstance(d, dict) or not set(_GRID) <= set(d):
            raise KVConfigError(f"{path}: a table has tokens, kv_tokens and seconds")
        return cls(**{k: d[k] for k in _GRID}, provenance=dict(d.get("provenance") or {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("provenance", *_GRID)}

    def lookup(self, num_tokens: float, kv_tokens: float) -> float:
        i, u = _bracket(self.tokens, num_tokens)
        j, v = _bracket(self.kv_tokens, kv_tokens)
        s = self.seconds
        a = s[i][j] * (1 - v) + s[i][j + 1] * v
        b = s[i + 1][j] * (1 - v) + s[i + 1][j + 1] * v
        return max(0.0, a * (1 - u) + b * u)

    def time(self, st: BatchStats) -> float:
        return self.lookup(st.num_tokens, st.kv_tokens)

    def describe(self) -> dict:
        return {
            "kind": self.name,
            "provenance": self.provenance,
            "grid": [len(self.tokens), len(self.kv_tokens)],
        }
