"""N serving instances on one simulated clock, a router in front (``simulate(instances=N)``).

Each instance is a ``sim.core.PoolInstance`` (its own metadata-only ``KVPool``,
policy and queue). A request is routed when it arrives by the library's
``LoadAwareScheduler`` (``sim.routers`` names the strategies) over a
``LoadMetricsCollector`` attached to the instances' pools; then it lives on
that instance exactly as in a single-instance replay (``sim.core``)::

    arrival ──route──> instance k: waiting ──admit──> prefill ──> decode ──> finish

Events of all instances share one heap, ordered as in ``sim.core`` (time,
then finish < prefill end < arrival, then scheduling order); an event only
changes its own instance, and only that instance is offered admission. With
round-robin and zero cost the fleet therefore equals replaying each
instance's subsequence alone, request for request.

Bounds recorded per request (blocks; ``summary()`` gives them as token ratios):

* ``routed_blocks``: what the chosen instance held when it was routed;
* ``best_blocks``: the best instance's hit at routing time (``regret`` =
  best - routed: reuse the router left behind);
* ``held_blocks``: the leading run held in *any* instance's cache when it
  started (every request could use every instance's cache, N x C in all):
  ``all_caches_hit_ratio`` >= the delivered ``token_hit_ratio`` always, and
  equal at N = 1.
* optionally (``pooled=True``) ``pooled_hit_ratio``: one pool of N x C blocks
  replayed under the same policy, mode and cost (a what-if, not a bound:
  under LRU a partitioned fleet can beat it on adversarial traces).
"""

from __future__ import annotations

from itertools import islice, repeat, takewhile
from operator import contains
from typing import Any

import numpy as np

from sagellm_kv_cache.errors import KVConfigError
from sagellm_kv_cache.placement import LoadAwareScheduler, LoadMetricsCollector
from traces.columnar import hash_view

from .core import Engine
from .instances import PoolInstance, SimClock
from .ratios import token_hit_ratio
from .result import clocked_times, isolated_times

__all__ = ["FleetEngine", "check_instances"]


def check_instances(instances: Any) -> int:
    if isinstance(instances, bool) or not isinstance(instances, int | np.integer) or instances < 1:
        raise KVConfigError(f"instances must be an integer >= 1, got {instances!r}")
    if instances > 4096:
        raise KVConfigError(f"instances must be at most 4096, got {instances}")
    return int(instances)


def _matcher(bp: Any) -> Any:
    """``hashes -> leading blocks cached`` on ``bp`` (most instances miss on the root: one probe)."""
    cached, match = bp.cached, bp.match_prefix

    def match_prefix(hs: list) -> int:
        return len(match(hs)) if hs and hs[0] in cached else 0

    return match_prefix


def _match_all(bps: list) -> Any:
    """``hashes -> [leading blocks cached on each of bps]`` in one call (hashes not empty)."""
    pairs = [(bp.cached, bp.cached.__contains__) for bp in bps]

    def match_all(hs: list) -> list[int]:
        h0 = hs[0]
        return [len(list(takewhile(has, hs))) if h0 in c else 0 for c, has in pairs]

    return match_all


class FleetEngine:
    """The fleet: N instances and their router around the one event engine (``sim.core``).

    It is the engine's ``router``: ``route`` asks the library's scheduler at each
    arrival (recording the routed and best instance's hits), ``starting`` records
    the leading run any cache holds as a request starts, and ``update`` keeps the
    collector's metrics current. ``run()`` fills per-request columns (``inst_of``,
    bounds, times) on ``self``.
    """

    def __init__(
        self,
        table: Any,
        *,
        num_instances: int,
        capacity_blocks: int,
        block_size: int,
        policy: str,
        cost: Any,
        router: Any,
        sequential: bool,
        max_num_seqs: int | None,
        bounds: bool = True,
        global_pool: dict | None = None,
        progress: bool = False,
    ) -> None:
        from .routers import make_scheduler

        n = len(table)
        self.lengths = lengths = table["input_length"].to_list()
        self.sessions = table["session_id"].to_list() if "session_id" in table.columns else None
        self.n = n
        self.bs = block_size
        self.bounds = bounds
        self.clock = SimClock()
        self.shared = None
        if global_pool:  # one shared remote tier behind every instance (sim.global_pool)
            from .global_pool import GlobalPool, GlobalPoolInstance

            g = dict(global_pool)
            self.shared = GlobalPool(g.pop("blocks"), block_size, policy, self.clock)
            self.insts: list[Any] = [
                GlobalPoolInstance(
                    capacity_blocks,
                    block_size,
                    policy,
                    self.clock,
                    cost,
                    n,
                    shared=self.shared,
                    **g,
                )
                for _ in range(num_instances)
            ]
        else:
            self.insts = [
                PoolInstance(capacity_blocks, block_size, policy, self.clock, cost, n)
                for _ in range(num_instances)
            ]
        for inst in self.insts[1:]:
            inst.share_columns(self.insts[0])
        self.collector = LoadMetricsCollector()
        self.devices = list(range(num_instances))
        for k, inst in enumerate(self.insts):
            self.collector.attach_pool(k, inst.pool, match_fn=_matcher(inst.bp))
        if hasattr(router, "select_device"):
            self.scheduler = router  # a caller's own (tests: a router that always picks 0)
        else:
            self.scheduler = make_scheduler(router, self.collector)
        self.routed = [0] * n
        self.best = [0] * n
        self.held = [0] * n
        self._match_all = _match_all([inst.bp for inst in self.insts])
        self.collector.attach_match_many(self.devices, self._match_all)
        self.metrics = [self.collector.get_metrics(k) for k in self.devices]
        # place(need, hashes, session) -> instance, over all the instances
        if hasattr(self.scheduler, "placer"):  # the library's: bound to the devices once
            # sequential: the metrics stay as registered (no ``update``), read once
            place = self.scheduler.placer(self.devices, fixed_metrics=sequential)
        else:  # a router with select_device only
            select, devices = self.scheduler.select_device, self.devices

            def place(need: int, hs: list, sess: Any) -> Any:
                return select(devices, need, None, block_hashes=hs, session_id=sess)

        self._place = place
        self._sequential = sequential
        caches = [inst.bp.cached for inst in self.insts]  # hash -> block, per instance
        self._holds = [c.__contains__ for c in caches]
        if self.shared is not None:  # what the shared tier holds is usable by every request
            caches.append(self.shared.cached)
        self._all_caches = caches
        self._all_holds = [c.__contains__ for c in caches]
        self.engine = Engine(
            hash_view(table),  # int ids: a flat view, a request's list made when it is served
            lengths,
            table["output_length"].to_list(),
            table["arrival_s"].to_list(),
            self.insts,
            self.clock,
            sequential=sequential,
            max_num_seqs=max_num_seqs,
            progress=progress,
            desc=f"fleet replay x {num_instances}",
            router=self,
        )
        #: sequential: nothing happens between a request's routing and its start, so
        #: ``route`` records ``held_blocks`` itself for a request that will start
        #: (one that fits the device: the engine's rejection rule without a tail block)
        self._held_at_route = bounds and sequential and not self.engine.tail
        self._cap = capacity_blocks
        self._starting = self._make_starting()
        self._route = self._make_route()
        # the closures themselves: no method call in between
        self.route = self._route  # type: ignore[method-assign]
        if not bounds or self._held_at_route:
            self.starting = None  # type: ignore[assignment]  # the engine skips it
        else:
            self.starting = self._starting  # type: ignore[method-assign]
        if sequential or not getattr(self.scheduler, "needs_metrics", True):
            self.update = None  # type: ignore[assignment]  # metrics stay as registered

    # -- the engine's router ------------------------------------------------------
    def route(self, i: int, hs: list) -> int:
        """The instance for request ``i`` (and, with bounds, the routed and best hits)."""
        return self._route(i, hs)

    def _make_route(self) -> Any:
        place, lengths, sessions = self._place, self.lengths, self.sessions
        if not self.bounds:
            if sessions is None:
                return lambda i, hs: place(lengths[i], hs, None)
            return lambda i, hs: place(lengths[i], hs, sessions[i])
        sched, routed, best = self.scheduler, self.routed, self.best
        # a prefix-aware library scheduler peeked every instance already (last_matches)
        peeked = isinstance(sched, LoadAwareScheduler) and sched.needs_prefix
        holds = self._holds

        def runs(k: int, hs: list) -> tuple[int, int]:
            """(the run instance k holds, the longest any instance holds) of ``hs``."""
            if peeked:
                matches = sched.last_matches
                return matches[k], max(matches)
            # the routed run, then only a cache holding the block after the longest
            # run so far can hold a longer one
            has = holds[k]
            r = b = len(list(takewhile(has, hs))) if has(hs[0]) else 0
            full = len(hs)
            for has in holds:
                if b == full:
                    break
                if has(hs[b]):
                    run = len(list(takewhile(has, hs)))
                    if run > b:
                        b = run
            return r, b

        if not self._held_at_route:

            def route(i: int, hs: list) -> int:
                k = place(lengths[i], hs, None if sessions is None else sessions[i])
                if hs:
                    routed[i], best[i] = runs(k, hs)
                return k

            return route
        held, cap = self.held, self._cap
        caches, extend = self._all_caches, self._starting
        shared = self.shared is not None

        def route_held(i: int, hs: list) -> int:
            k = place(lengths[i], hs, None if sessions is None else sessions[i])
            if hs:
                routed[i], best[i] = runs(k, hs)
                b = best[i]
                full = len(hs)
                if full <= cap and (b or shared):  # it starts: the run any cache holds
                    if b < full and True in map(contains, caches, repeat(hs[b])):
                        extend(i, k, hs)
                    else:
                        held[i] = b
            return k

        return route_held

    def starting(self, i: int, k: int, hs: list) -> None:
        """The leading run held by any cache now (``held_blocks``): from a run known held
        (sequential: the best instance's at routing, nothing changed since; else instance
        k's own), extended by whichever cache holds the next block, as far as it goes."""
        self._starting(i, k, hs)

    def _make_starting(self) -> Any:
        held, best, own, holds = self.held, self.best, self._holds, self._all_holds
        sequential = self._sequential
        # sequential, no shared tier: a best run of 0 means no cache holds the first block
        none_held = sequential and self.shared is None

        def starting(i: int, k: int, hs: list) -> None:
            if sequential:
                j = best[i]
                if not j and none_held:
                    return  # held[i] stays 0
            else:
                j = len(list(takewhile(own[k], hs)))
            full = len(hs)
            while j < full:
                j0 = j
                for hold in holds:
                    if hold(hs[j]):
                        j += len(list(takewhile(hold, islice(hs, j, None))))
                        if j == full:
                            break
                if j == j0:
                    break
            held[i] = j

        return starting

    def update(self, k: int, running: int, waiting: int, used: int) -> None:
        m = self.metrics[k]
        m.active_requests, m.queue_length, m.kv_tokens_used = running, waiting, used * self.bs

    def run(self) -> FleetEngine:
        eng = self.engine.run()
        self.inst_of, self.full, self.rejected = eng.inst_of, eng.full, eng.rejected
        self.start_s, self.prefill_end_s, self.finish_s = (
            eng.start_s,
            eng.prefill_end_s,
            eng.finish_s,
        )
        self.peak_used, self.peak_waiting = eng.peak_used, eng.peak_waiting
        return self


def _group_quantiles(group: np.ndarray, values: np.ndarray, num_groups: int, qs: tuple) -> Any:
    """``np.percentile(values[group == g], qs)`` for every group ``g`` (NaN values
    left out; 0.0 for a group with none), after one sort by group instead of a
    mask per group. Rows: ``qs`` (percent); columns: groups."""
    keep = ~np.isnan(values)
    group, values = group[keep], values[keep]
    by_group = values[np.argsort(group, kind="stable")]
    ends = np.cumsum(np.bincount(group, minlength=num_groups))[:-1]
    out = np.zeros((len(qs), num_groups))
    for g, part in enumerate(np.split(by_group, ends)):
        if len(part):
            out[:, g] = np.percentile(part, qs)
    return out


def _per_instance(
    inst: np.ndarray, records: Any, num_instances: int, eng: FleetEngine, bs: int
) -> list[dict]:
    """One dict per instance: load (requests, prompt tokens), hits, blocks in use, queueing, TTFT."""
    requests = np.bincount(inst, minlength=num_instances)
    prompt = np.bincount(inst, records["input_length"].to_numpy(), num_instances)
    hit = np.bincount(inst, records["hit_blocks"].to_numpy(), num_instances)
    timed = {}
    if "ttft_s" in records.columns:
        for name in ("queue_s", "ttft_s"):
            col = records[name].cast(float).to_numpy()
            p50, p99 = _group_quantiles(inst, col, num_instances, (50, 99))
            timed[name[:-2]] = (p50, p99)
    out = []
    for k in range(num_instances):
        p = int(prompt[k])
        row: dict[str, Any] = {
            "instance": k,
            "requests": int(requests[k]),
            "prompt_tokens": p,
            "token_hit_ratio": token_hit_ratio(int(hit[k]), bs, p),
            "evictions": int(eng.insts[k].num_evictions),
            "blocks_in_use_end": int(eng.insts[k].num_used),
        }
        if timed:
            row["peak_blocks_in_use"] = int(eng.peak_used[k])
            row["peak_waiting"] = int(eng.peak_waiting[k])
            for base, (p50, p99) in timed.items():
                row[f"{base}_p50_s"] = float(p50[k])
                row[f"{base}_p99_s"] = float(p99[k])
        out.append(row)
    return out


def _imbalance(values: list[float]) -> float:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


def _global_settings(
    spec: Any, link: Any, overlap: bool, table: Any, bs: int, shape: Any, resolve: Any
) -> dict | None:
    """``GlobalPoolInstance`` keywords for ``fleet_options["global_pool"]`` (a capacity)."""
    if spec is None:
        return None
    from .global_pool import GLOBAL_LINK
    from .tiered import Link

    if shape is None:
        raise KVConfigError(
            "a global pool needs a model shape (the bytes each fetched block costs)"
        )
    blocks, _ = resolve(spec, table, bs, shape)
    if blocks is None:
        blocks = max(1, sum(x // bs for x in table["input_length"].to_list()))
    if link is None:
        link = GLOBAL_LINK
    elif isinstance(link, dict):
        link = Link(**link)
    if not isinstance(link, Link):
        raise KVConfigError(f"global_link must be a sim.tiered.Link, got {link!r}")
    return {
        "blocks": blocks,
        "link": link,
        "bytes_per_block": shape.bytes_per_block(bs),
        "num_layers": shape.num_layers,
        "overlap": bool(overlap),
    }


def simulate_fleet(
    table: Any,
    capacity: Any,
    policy: str,
    *,
    instances: int,
    router: Any,
    mode: str,
    cost: Any,
    max_num_seqs: int | None,
    model_shape: Any,
    block_size: int | None,
    bounds: bool = True,
    pooled: bool = False,
    global_pool: Any = None,
    global_link: Any = None,
    layerwise_overlap: bool = True,
    progress: bool = False,
    config: dict | None = None,
) -> Any:
    """``simulate(..., instances=N, router=SPEC)``: see the module docstring."""
    import dataclasses

    from .result import BlockCounts, build_result
    from .routers import parse_router
    from .simulate import _cost, _distinct_blocks, resolve_blocks, simulate

    nk = check_instances(instances)
    label = router.__class__.__name__ if hasattr(router, "select_device") else None
    if label is None:
        label = parse_router("round-robin" if router is None else router).label
    n = len(table)
    bs = int(table["block_size"][0]) if n and "block_size" in table.columns else 512
    if block_size is not None and n and block_size != bs:
        raise KVConfigError(f"block_size {block_size} differs from the table's {bs}")
    cost_m = _cost(cost)
    sequential = mode == "sequential"
    lengths = table["input_length"].to_list()
    shape = model_shape
    if isinstance(shape, str):  # a preset, LAYERS,KV_HEADS,HEAD_DIM,DTYPE or a config.json
        from sagellm_kv_cache.model_shapes import resolve_model_shape

        shape = resolve_model_shape(shape)
    blocks, cap_info = resolve_blocks(capacity, table, bs, shape)
    if blocks is None:
        blocks = _distinct_blocks(table) if sequential else max(1, sum(x // bs for x in lengths))
    eng = FleetEngine(
        table,
        num_instances=nk,
        capacity_blocks=blocks,
        block_size=bs,
        policy=policy,
        cost=cost_m,
        router=router if router is not None else "round-robin",
        sequential=sequential,
        max_num_seqs=max_num_seqs,
        bounds=bounds,
        progress=progress,
        global_pool=_global_settings(
            global_pool, global_link, layerwise_overlap, table, bs, shape, resolve_blocks
        ),
    ).run()
    inst_of = np.asarray(eng.inst_of, dtype=np.int64)
    inst0 = eng.insts[0]  # its per-request columns are every instance's (share_columns)

    def gather(attr: str) -> np.ndarray:
        return np.asarray(getattr(inst0, attr), dtype=np.int64)

    hit, alloc, evicted = gather("hit"), gather("alloc"), gather("evicted")
    rej = np.asarray(eng.rejected, dtype=bool)
    ran = ~rej
    if sequential:
        times = isolated_times(table, inst0, hit, cost_m, ran)
        clock_kind = "isolated"
    else:
        times = clocked_times(eng)
        clock_kind = "simulated"
    policy_name = inst0.policy_name
    resolved = {
        "mode": mode,
        "policy": policy_name,
        "capacity": cap_info,
        "capacity_blocks": blocks,
        "block_size": bs,
        "max_num_seqs": max_num_seqs,
        "cost": dataclasses.asdict(cost_m),
        "model_shape": str(model_shape) if model_shape is not None else None,
        "instances": nk,
        "router": label,
        "global_pool": None if global_pool is None else str(global_pool),
        **(config or {}),
    }
    res = build_result(
        table,
        mode=mode,
        policy=policy_name,
        capacity_blocks=blocks,
        block_size=bs,
        blocks=BlockCounts(eng.full, hit, alloc, evicted, rej),
        evictions=sum(x.num_evictions for x in eng.insts),
        hits_per_tier=None
        if eng.shared is None
        else {"gpu": gather("local"), "global": gather("remote")},
        times=times,
        clock=clock_kind,
        config=resolved,
        more={"max_num_seqs": max_num_seqs, "cost": resolved["cost"]},
    )
    import polars as pl

    routed_a, best_a, held_a = (
        np.asarray(col, dtype=np.int64) for col in (eng.routed, eng.best, eng.held)
    )
    res.records = res.records.with_columns(
        pl.Series("instance", inst_of, dtype=pl.Int64),
        pl.Series("routed_blocks", routed_a),
        pl.Series("best_blocks", best_a),
        pl.Series("held_blocks", held_a),
    )
    per = _per_instance(inst_of, res.records, nk, eng, bs)
    prompt = int(res.stats["prompt_tokens"]) or 0

    def ratio(col: Any) -> float:
        return token_hit_ratio(int(np.asarray(col, dtype=np.int64)[ran].sum()), bs, prompt)

    extra: dict[str, Any] = {
        "instances": nk,
        "router": label,
        "load_imbalance": _imbalance([float(r["prompt_tokens"]) for r in per]),
        "request_imbalance": _imbalance([float(r["requests"]) for r in per]),
    }
    if bounds:
        routed, best = ratio(routed_a), ratio(best_a)
        extra.update(
            all_caches_hit_ratio=ratio(held_a),
            best_instance_hit_ratio=best,
            routed_hit_ratio=routed,
            regret_hit_ratio=best - routed,
        )
    if eng.shared is not None:
        extra["global_pool_blocks"] = eng.shared.capacity_blocks
        extra["global_hit_ratio"] = ratio(gather("remote"))
    if pooled:
        big = simulate(
            table, blocks * nk, policy, mode=mode, cost=cost_m, max_num_seqs=max_num_seqs
        )
        extra["pooled_hit_ratio"] = float(big.token_hit_ratio)
    extra["per_instance"] = per
    res.stats.update(extra)
    return res
