"""Configuration fields a sweep varies besides capacity and policy (``sim.sweep.sweep(grid=)``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagellm_kv_cache.errors import KVConfigError

__all__ = ["ENGINES", "GRID_FIELDS", "grid_settings"]

#: fields ``grid=`` may vary (each is a keyword of ``sim.simulate.simulate``); ``engine``
#: is ``"request"`` (the event engine) or ``"iteration"`` (vLLM-v1-like steps, one instance)
GRID_FIELDS = ("max_num_seqs", "cost", "tiers", "model_shape", "instances", "router", "engine")
ENGINES = ("request", "iteration")
#: fields the iteration engine has no use for (it runs one instance, one tier)
_NOT_ITERATION = ("tiers", "instances", "router")


def grid_settings(grid: dict[str, Sequence[Any]] | None) -> list[tuple]:
    """Every combination of ``grid``'s values as ``((name, value), ...)`` (``[()]``: none)."""
    import itertools

    if not grid:
        return [()]
    if not isinstance(grid, dict):
        raise KVConfigError(f"grid must be a dict of field -> values, got {type(grid).__name__}")
    names = list(grid)
    for name in names:
        if name not in GRID_FIELDS:
            raise KVConfigError(f"cannot sweep {name!r}; fields: {list(GRID_FIELDS)}")
    values = []
    for name in names:
        v = grid[name]
        v = [v] if isinstance(v, str | int | dict) or v is None else list(v)
        if not v:
            raise KVConfigError(f"grid field {name!r} has no values")
        values.append(v)
    if "engine" in grid:
        engines = values[names.index("engine")]
        bad = [e for e in engines if e not in ENGINES]
        if bad:
            raise KVConfigError(f"engine must be one of {list(ENGINES)}, got {bad[0]!r}")
        clash = [n for n in _NOT_ITERATION if n in grid]
        if "iteration" in engines and clash:
            raise KVConfigError(
                f"engine 'iteration' runs one instance with one tier: cannot sweep it with {clash}"
            )
    return [tuple(zip(names, combo, strict=True)) for combo in itertools.product(*values)]
