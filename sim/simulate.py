"""``simulate``: one entry point over the event engine (``sim.core``) for every mode.

``replay_sequential``, ``replay_concurrent`` and ``replay_tiered`` are thin
calls of this with their mode; all return a ``SimResult`` (``sim.result``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError
from traces.columnar import hash_view

from .config import LinearCostModel
from .core import Engine
from .instances import PoolInstance, SimClock, TieredInstance
from .result import BlockCounts, SimResult, build_result, clocked_times, isolated_times

__all__ = ["MODES", "resolve_blocks", "simulate"]

MODES = ("sequential", "concurrent")
_REQUIRED = ("request_id", "arrival_s", "input_length", "output_length", "block_hashes")


def _distinct_blocks(table: Any) -> int:
    if not len(table):
        return 1
    return max(1, int(table["block_hashes"].explode().drop_nulls().n_unique()))


def resolve_blocks(
    capacity: Any, table: Any, block_size: int, model_shape: Any = None
) -> tuple[int | None, dict]:
    """``capacity`` (anything ``sim.config`` parses: 2000, "5.12Mt", "40GiB", "10%", "inf",
    None) in blocks of ``block_size`` (None: infinite), and its description
    ``{"spec", "unit", "blocks"}`` for the resolved config."""
    from . import config as cfg

    try:  # the one capacity grammar (blocks, tokens, bytes, share, inf), when present
        from .capacity import resolve_capacity as resolve
    except ImportError:  # pragma: no cover - older tree
        resolve = getattr(cfg, "resolve_capacity", None)
    spec = "inf" if capacity is None else capacity
    if isinstance(spec, bool) or (
        isinstance(spec, int | np.integer) and not isinstance(spec, bool) and spec < 1
    ):
        raise KVConfigError(f"capacity must be a positive number of blocks, got {capacity!r}")
    text = str(int(spec)) if isinstance(spec, int | np.integer) else spec
    if resolve is not None:
        cap = resolve(
            text,
            block_size=block_size,
            model_shape=model_shape,
            distinct_blocks=lambda: _distinct_blocks(table),
        )
        blocks, unit = cap.blocks, cap.unit
        return blocks, {"spec": str(cap.spec), "unit": unit, "label": cap.label, "blocks": blocks}
    else:
        parsed = cfg.parse_capacity(text)
        blocks, unit = parsed.to_blocks(block_size, model_shape), parsed.unit
    return blocks, {"spec": str(text), "unit": unit, "blocks": blocks}


def _cost(cost: Any) -> LinearCostModel:
    if cost is None:
        return LinearCostModel()
    if isinstance(cost, LinearCostModel):
        return cost
    if isinstance(cost, dict):
        return LinearCostModel(**cost)
    if isinstance(cost, str):
        return LinearCostModel.parse(cost)
    raise KVConfigError(f"cost must be a LinearCostModel, dict or string, got {cost!r}")


def simulate(
    table: Any,
    capacity: Any = None,
    policy: str = "lru",
    *,
    mode: str = "sequential",
    cost: Any = None,
    max_num_seqs: int | None = None,
    tiers: dict[str, Any] | None = None,
    model_shape: Any = None,
    links: dict | None = None,
    layerwise_overlap: bool = True,
    block_size: int | None = None,
    hooks: tuple = (),
    progress: bool = False,
    config: dict | None = None,
    instances: int | None = None,
    router: Any = None,
    fleet_options: dict | None = None,
    engine: str = "request",
    iteration: dict | None = None,
    hashes: Any = None,
) -> SimResult:
    """Replay a canonical trace table on the event engine.

    Args:
        table: polars DataFrame (``traces``): ``request_id, arrival_s,
            input_length, output_length, block_hashes, block_size``.
        capacity: device cache size in any unit ``sim.config`` parses (None: infinite).
        policy: eviction policy name.
        mode: ``"sequential"`` (zero time, one at a time) or ``"concurrent"`` (clocked).
        cost: ``LinearCostModel`` (or its dict / ``name=value`` text) for durations.
        max_num_seqs: concurrent mode: most requests running at once.
        tiers: ``{"gpu": cap, "cpu": cap, ...}`` (device first) for a tiered
            instance (``KVOffloadManager``); ``capacity`` is then ignored.
        model_shape: ``ModelShape`` or preset name: byte capacities and, for
            tiers, the bytes each loaded block costs.
        links: tier name -> ``sim.tiered.Link`` overrides.
        layerwise_overlap: tiers: loading overlaps computing layer by layer.
        block_size: must equal the table's when given.
        hooks: metric hooks (``sim.core``).
        progress: a progress bar.
        instances, router: N instances behind a router (``sim.fleet``; router
            spec as ``sim.routers`` names it, default round-robin); either one
            set makes it a fleet replay. ``fleet_options``: ``bounds``, ``pooled``.
        config: extra entries for the resolved config (trace path, format...).
        engine: ``"request"`` (this event engine) or ``"iteration"`` (vLLM-v1-like
            steps, ``sim.iteration_run.simulate_iteration``; ``cost`` may then be any
            ``sim.cost`` spec, ``iteration`` its options: ``max_num_batched_tokens``,
            ``chunked_prefill``, ``slo``; ``mode`` is ignored).
        hashes: the block hashes as a sequence view (``traces.columnar``; e.g. a
            ``StreamedHashes`` for ``sim.stream``) in place of the table's column.

    Returns:
        a ``SimResult``.

    Raises:
        KVConfigError: bad settings. KVInvalidInputError: the table lacks a column.
    """
    if engine == "iteration":  # the step-level engine (sim.iteration): its own module
        from .iteration_run import simulate_iteration

        return simulate_iteration(
            table, capacity, policy, cost=cost, max_num_seqs=max_num_seqs,
            model_shape=model_shape, block_size=block_size, progress=progress,
            config=config, **(iteration or {}),
        )  # fmt: skip
    if engine != "request":
        raise KVConfigError(f"engine must be 'request' or 'iteration', got {engine!r}")
    if mode not in MODES:
        raise KVConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(getattr(table, "columns", None), list | tuple):
        raise KVInvalidInputError(
            f"table must be a trace table (polars DataFrame from traces.read_trace), "
            f"got {type(table).__name__}"
        )
    missing = [c for c in _REQUIRED[: 4 if hashes is not None else 5] if c not in table.columns]
    if missing:
        raise KVInvalidInputError(f"trace table lacks column(s) {missing}")
    if instances is not None or router is not None:
        from .fleet import simulate_fleet

        if tiers or hooks:
            raise KVConfigError("a fleet replay (instances/router) takes no tiers or hooks yet")
        return simulate_fleet(
            table,
            capacity,
            policy,
            instances=1 if instances is None else instances,
            router=router,
            mode=mode,
            cost=cost,
            max_num_seqs=max_num_seqs,
            model_shape=model_shape,
            block_size=block_size,
            progress=progress,
            config=config,
            **(fleet_options or {}),
        )
    n = len(table)
    bs = int(table["block_size"][0]) if n and "block_size" in table.columns else 512
    if block_size is not None and n and block_size != bs:
        raise KVConfigError(
            f"block_size {block_size} differs from the table's {bs}: re-read the "
            f"trace at that block size (formats with fixed hash ids cannot be re-hashed)"
        )
    if max_num_seqs is not None and (
        isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1
    ):
        raise KVConfigError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
    cost_m = _cost(cost)
    sequential = mode == "sequential"
    # flat values + offsets; each request's ids become a list only when it is served
    # ids other than ints (str, bytes) stay per-request lists (traces.columnar.hash_view)
    hashes_col = hash_view(table) if hashes is None else hashes
    lengths = table["input_length"].to_list()
    outputs = table["output_length"].to_list()
    arrivals = table["arrival_s"].to_list()
    clock = SimClock()
    shape = model_shape
    if isinstance(shape, str):
        from sagellm_kv_cache.storage import ModelShape

        shape = ModelShape.named(shape)

    def all_full() -> int:
        return max(1, sum(x // bs for x in lengths))

    cap_info: dict[str, Any]
    if tiers:
        from .tiered import LINKS

        caps: dict[str, int] = {}
        cap_info = {}
        for name, spec in tiers.items():
            blocks, info = resolve_blocks(spec, table, bs, shape)
            caps[name] = blocks if blocks is not None else all_full()
            cap_info[name] = info
        if shape is None:
            raise KVConfigError("tiers need a model shape (the bytes each loaded block costs)")
        link_map = dict(LINKS)
        link_map.update(links or {})
        inst: Any = TieredInstance(
            caps,
            bs,
            policy,
            clock,
            cost_m,
            n,
            links=link_map,
            bytes_per_block=shape.bytes_per_block(bs),
            num_layers=shape.num_layers,
            overlap=bool(layerwise_overlap),
        )
        capacity_blocks = next(iter(caps.values()))
    else:
        blocks, cap_info = resolve_blocks(capacity, table, bs, shape)
        if blocks is None:
            # infinite: nothing is ever evicted (sequential: the distinct blocks; clocked:
            # every full block, since overlapping requests may each hold a copy)
            blocks = _distinct_blocks(table) if sequential else all_full()
        capacity_blocks = blocks
        inst = PoolInstance(blocks, bs, policy, clock, cost_m, n)
    eng = Engine(
        hashes_col,
        lengths,
        outputs,
        arrivals,
        inst,
        clock,
        sequential=sequential,
        max_num_seqs=max_num_seqs,
        hooks=tuple(hooks),
        progress=progress,
        desc=f"{mode} replay {inst.policy_name} @ {capacity_blocks} blocks",
    ).run()
    evictions = inst.num_evictions
    stats = inst.close()
    hit = np.asarray(inst.hit, dtype=np.int64)
    rej = np.asarray(eng.rejected, dtype=bool)
    ran = ~rej
    if sequential:  # each request's cost alone
        times = isolated_times(table, inst, hit, cost_m, ran)
        clock_kind = "isolated"
    else:
        times = clocked_times(eng)
        clock_kind = "simulated"
    resolved = {
        "mode": mode,
        "policy": inst.policy_name,
        "capacity": cap_info,
        "capacity_blocks": capacity_blocks,
        "block_size": bs,
        "max_num_seqs": max_num_seqs,
        "cost": dataclasses.asdict(cost_m),
        "model_shape": str(model_shape) if model_shape is not None else None,
        "tiers": {k: int(v) for k, v in caps.items()} if tiers else None,
        **(config or {}),
    }
    more: dict[str, Any] = {"max_num_seqs": max_num_seqs, "cost": resolved["cost"]}
    if tiers:
        more["tiers"] = dict(resolved["tiers"])
        more["tier_stats"] = {
            t: {"evicted_blocks": int(s.get("evicted_blocks", 0))}
            for t, s in stats.get("tiers", {}).items()
        }
    return build_result(
        table,
        mode=mode if not tiers else f"{mode}+tiers",
        policy=inst.policy_name,
        capacity_blocks=capacity_blocks,
        block_size=bs,
        blocks=BlockCounts(eng.full, hit, inst.alloc, inst.evicted, rej),
        evictions=evictions,
        hits_per_tier=inst.hits_per_tier,
        times=times,
        clock=clock_kind,
        config=resolved,
        timeline=None if sequential else eng.timeline,
        peaks=None if sequential else tuple(eng.peaks),
        more=more,
    )
