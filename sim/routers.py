"""Routers by name: ``"kv-aware:weight=1,temperature=0"`` -> a library ``LoadAwareScheduler``.

The simulator routes with the library's placement strategies
(``sagellm_kv_cache.placement``); this module only names them and parses
their parameters. A spec is ``NAME`` or ``NAME:key=value,key=value``:

================  ===================  =========================================
name              strategy             parameters (default)
================  ===================  =========================================
round-robin       round_robin
random            random               seed (0)
least-load        lowest_kv            (fewest KV blocks in use / capacity)
shortest-queue    shortest_queue       (fewest running + waiting requests)
best-fit          best_fit
longest-prefix    longest_prefix
kv-aware          kv_cost (Dynamo)     weight (1.0), temperature (0.0), seed (0)
cache-aware       cache_aware (SGLang) cache_threshold (0.3),
                                       balance_abs_threshold (64),
                                       balance_rel_threshold (1.5)
consistent-hash   consistent_hash      key (session | prefix; session),
                                       virtual_nodes (64)
================  ===================  =========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sagellm_kv_cache.errors import KVConfigError

__all__ = ["ROUTERS", "RouterSpec", "make_scheduler", "parse_router"]

#: name -> (strategy value, {parameter: (scheduler keyword, type)})
ROUTERS: dict[str, tuple[str, dict[str, tuple[str, type]]]] = {
    "round-robin": ("round_robin", {}),
    "random": ("random", {"seed": ("seed", int)}),
    "least-load": ("lowest_kv", {}),
    "shortest-queue": ("shortest_queue", {}),
    "best-fit": ("best_fit", {}),
    "longest-prefix": ("longest_prefix", {}),
    "kv-aware": (
        "kv_cost",
        {
            "weight": ("overlap_score_weight", float),
            "temperature": ("temperature", float),
            "seed": ("seed", int),
        },
    ),
    "cache-aware": (
        "cache_aware",
        {
            "cache_threshold": ("cache_threshold", float),
            "balance_abs_threshold": ("balance_abs_threshold", float),
            "balance_rel_threshold": ("balance_rel_threshold", float),
        },
    ),
    "consistent-hash": (
        "consistent_hash",
        {"key": ("hash_key", str), "virtual_nodes": ("virtual_nodes", int)},
    ),
}


@dataclass(frozen=True)
class RouterSpec:
    """A parsed router: ``name``, its strategy and scheduler keywords; ``label`` reads back."""

    name: str
    strategy: str
    params: tuple  # ((scheduler keyword, value), ...) in the order given

    @property
    def label(self) -> str:
        inv = {kw: p for p, (kw, _) in ROUTERS[self.name][1].items()}
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{inv[k]}={v}" for k, v in self.params)


def parse_router(spec: Any) -> RouterSpec:
    """``"kv-aware:weight=1,temperature=0"`` -> ``RouterSpec`` (KVConfigError naming the mistake)."""
    if isinstance(spec, RouterSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise KVConfigError(f"router must be a name like 'round-robin', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().replace("_", "-")
    if name not in ROUTERS:
        raise KVConfigError(f"unknown router {name!r}; one of {sorted(ROUTERS)}")
    strategy, allowed = ROUTERS[name]
    params: list[tuple[str, Any]] = []
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in allowed:
            raise KVConfigError(
                f"router {name!r}: bad parameter {item!r}; takes {sorted(allowed) or 'none'}"
            )
        kw, typ = allowed[key]
        value = value.strip()
        try:
            v: Any = typ(value)
        except ValueError:
            raise KVConfigError(
                f"router {name!r}: {key} must be {typ.__name__}, got {value!r}"
            ) from None
        if key == "key" and v not in ("session", "prefix"):
            raise KVConfigError(f"router {name!r}: key must be session or prefix, got {v!r}")
        params.append((kw, v))
    return RouterSpec(name, strategy, tuple(params))


def make_scheduler(spec: Any, collector: Any) -> Any:
    """The library's ``LoadAwareScheduler`` for a router spec over ``collector``.

    The simulator keeps the metrics current itself (``auto_refresh=False``).
    """
    from sagellm_kv_cache.placement import LoadAwareScheduler

    rs = parse_router(spec)
    return LoadAwareScheduler(collector, rs.strategy, auto_refresh=False, **dict(rs.params))
