"""A frozen copy of the replay loops before the event engine (sim/core.py), kept only so
``bench_replay.py`` can measure the engine against them in one run. Not used elsewhere.

Copied from sim/replay.py (replay_sequential) and sim/engine.py (replay_concurrent)
at the commit before the engine landed; the sequential result is a plain dict.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError, KVNoVictimError
from sim.config import LinearCostModel, ReplayConfig

_FINISH = 0
_PREFILL_END = 1
_ARRIVAL = 2
_REQUIRED = ("request_id", "arrival_s", "input_length", "output_length", "block_hashes")


def old_replay_sequential(
    table, capacity_blocks: int | None, policy: str = "lru", *, progress: bool = False
) -> dict:
    """Replay a canonical trace table sequentially at ``capacity_blocks`` (None: infinite).

    Infinite capacity uses a pool as large as the trace's distinct blocks, which
    never evicts.
    """
    hashes_col = table["block_hashes"].to_list()
    lengths = table["input_length"].to_list()
    block_size = int(table["block_size"][0]) if len(table) else 512
    if capacity_blocks is None:
        capacity_blocks = max(1, len({h for hs in hashes_col for h in hs}))
    n = len(lengths)
    hit_arr = np.zeros(n, dtype=np.int64)
    full_arr = np.zeros(n, dtype=np.int64)
    evict_arr = np.zeros(n, dtype=np.int64)
    bp = BlockPool(capacity_blocks, block_size, policy)
    match, touch, allocate, cache, release = (
        bp.match_prefix,
        bp.touch,
        bp.allocate,
        bp.cache_blocks,
        bp.release,
    )
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"replay {policy} @ {capacity_blocks} blocks", unit="req")
    for i in it:
        full = lengths[i] // block_size
        if not full:
            continue
        hs = hashes_col[i][:full]
        if full > capacity_blocks:  # never fits: counted as a miss, nothing cached
            full_arr[i] = full
            continue
        hit = match(hs)
        before = bp.num_evictions
        if hit:
            touch(hit)
        ids = hit + allocate(full - len(hit))
        cache(ids, hs, len(hit))
        release(ids)
        hit_arr[i] = len(hit)
        full_arr[i] = full
        evict_arr[i] = bp.num_evictions - before
    hit_blocks = int(hit_arr.sum())
    full_blocks = int(full_arr.sum())
    prompt_tokens = int(sum(lengths))
    return dict(
        capacity_blocks=capacity_blocks,
        policy=policy,
        block_size=block_size,
        num_requests=n,
        token_hit_ratio=hit_blocks * block_size / prompt_tokens if prompt_tokens else 0.0,
        block_hit_ratio=hit_blocks / full_blocks if full_blocks else 0.0,
        request_hit_ratio=float((hit_arr > 0).mean()) if n else 0.0,
        hit_blocks=hit_blocks,
        full_blocks=full_blocks,
        prompt_tokens=prompt_tokens,
        evictions=bp.num_evictions,
        records={
            "request_id": np.asarray(table["request_id"].to_list(), dtype=object),
            "arrival_s": table["arrival_s"].to_numpy(),
            "input_length": np.asarray(lengths, dtype=np.int64),
            "full_blocks": full_arr,
            "hit_blocks": hit_arr,
            "hit_tokens": hit_arr * block_size,
            "evicted_blocks": evict_arr,
        },
    )


class _SimClock:
    """The simulated clock handed to the pool (and through it to the policy)."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ConcurrentResult:
    """Outcome of ``replay_concurrent``: summary figures plus per-request records.

    ``records`` (polars, one row per trace row, in trace order): ``request_id,
    arrival_s, start_s, queue_s, prefill_end_s, finish_s, ttft_s, input_length,
    output_length, full_blocks, hit_blocks, hit_tokens, allocated_blocks,
    evicted_blocks, rejected``; times are NaN for rejected requests.
    ``timeline`` (polars, one row per event): ``time_s, waiting, running,
    blocks_in_use``, the state right after the event.
    Queue and TTFT statistics cover admitted requests only.
    """

    capacity_blocks: int
    policy: str
    block_size: int
    max_num_seqs: int | None
    num_requests: int
    num_rejected: int
    token_hit_ratio: float
    block_hit_ratio: float
    request_hit_ratio: float
    hit_blocks: int
    full_blocks: int
    prompt_tokens: int
    evictions: int
    peak_blocks_in_use: int
    peak_running: int
    peak_waiting: int
    makespan_s: float
    queue_mean_s: float
    queue_p50_s: float
    queue_p99_s: float
    queue_max_s: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    ttft_max_s: float
    cost: dict
    records: Any  # polars.DataFrame
    timeline: Any  # polars.DataFrame

    def summary(self) -> dict:
        """Every field but the two tables (JSON-ready)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("records", "timeline")
        }


def _resolve_config(config: ReplayConfig | dict | None, overrides: dict) -> ReplayConfig:
    if config is None:
        config = ReplayConfig()
    elif isinstance(config, dict):
        config = ReplayConfig(**config)
    elif not isinstance(config, ReplayConfig):
        raise KVConfigError(f"config must be a ReplayConfig, dict or None, got {config!r}")
    if "cost_model" in overrides:  # the name the CLI uses
        overrides["cost"] = overrides.pop("cost_model")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ReplayConfig)}
    if unknown:
        raise KVConfigError(f"unknown replay setting(s) {sorted(unknown)}")
    return dataclasses.replace(config, **{**overrides, "mode": "concurrent"})


def _stats(a: np.ndarray) -> tuple[float, float, float, float]:
    if not len(a):
        return 0.0, 0.0, 0.0, 0.0
    return (
        float(a.mean()),
        float(np.percentile(a, 50)),
        float(np.percentile(a, 99)),
        float(a.max()),
    )


def old_replay_concurrent(
    table, config: ReplayConfig | dict | None = None, /, **overrides: Any
) -> ConcurrentResult:
    """Replay a canonical trace table with overlapping requests on a simulated clock.

    Args:
        table: polars DataFrame with ``request_id, arrival_s, input_length,
            output_length, block_hashes`` (list of ints) and ``block_size``
            (see ``traces``).
        config: a ``ReplayConfig`` (or a dict of its fields); ``capacity``,
            ``policy``, ``cost``, ``max_num_seqs``, ``model_shape``,
            ``block_size`` and ``progress`` are used here.
        **overrides: ``ReplayConfig`` fields replacing the config's
            (``capacity=3``, ``cost=LinearCostModel.zero()``, ``max_num_seqs=4``...;
            ``cost_model=`` is accepted for ``cost=``).

    Returns:
        a ``ConcurrentResult``.

    Raises:
        KVConfigError: bad settings (unknown policy, capacity below one block,
            bytes without a model shape, a ``block_size`` other than the table's).
        KVInvalidInputError: the table lacks a required column.
    """
    cfg = _resolve_config(config, dict(overrides))
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise KVInvalidInputError(f"trace table lacks column(s) {missing}")
    n = len(table)
    block_size = int(table["block_size"][0]) if n and "block_size" in table.columns else 512
    if cfg.block_size is not None and n and cfg.block_size != block_size:
        raise KVConfigError(
            f"block_size {cfg.block_size} differs from the table's {block_size}: re-read the "
            f"trace at that block size (formats with fixed hash ids cannot be re-hashed)"
        )
    cost: LinearCostModel = cfg.cost
    max_seqs = cfg.max_num_seqs
    hashes_col = table["block_hashes"].to_list()
    lengths = table["input_length"].to_list()
    outputs = table["output_length"].to_list()
    arrivals = table["arrival_s"].to_list()
    capacity = cfg.capacity_blocks(block_size)
    if capacity is None:
        # infinite: every full block the trace could ever allocate, so nothing is
        # evicted and nobody waits for blocks (overlapping requests may each hold
        # a copy of a prefix still in prefill, so the distinct count is not enough)
        capacity = max(1, sum(n_in // block_size for n_in in lengths))

    clock = _SimClock()
    bp = BlockPool(capacity, block_size, cfg.policy, clock=clock)
    policy_name = bp.policy.name
    match, touch, allocate, cache, release = (
        bp.match_prefix,
        bp.touch,
        bp.allocate,
        bp.cache_blocks,
        bp.release,
    )
    evictable_among = bp.num_evictable_among

    nan = math.nan
    start_s = [nan] * n
    prefill_end_s = [nan] * n
    finish_s = [nan] * n
    full_l = [0] * n
    hit_l = [0] * n
    alloc_l = [0] * n
    evict_l = [0] * n
    rejected = [False] * n
    held: list[list[int] | None] = [None] * n  # block ids a running request holds
    # one row per event: typed arrays keep a million-request replay's timeline small
    tl_time = array("d")
    tl_wait = array("q")
    tl_run = array("q")
    tl_used = array("q")

    order = sorted(range(n), key=arrivals.__getitem__)  # stable: ties keep trace order
    events: list[tuple[float, int, int, int]] = []  # (time, kind, seq, request)
    waiting: deque[int] = deque()
    running = 0
    seq = 0
    peak_used = peak_running = peak_waiting = 0

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"concurrent replay {policy_name} @ {capacity} blocks", unit="req")

    def admit(now: float) -> None:
        """Start queued requests in FIFO order while the head fits (closure over the loop)."""
        nonlocal running, seq, peak_used, peak_running
        while waiting and (max_seqs is None or running < max_seqs):
            i = waiting[0]
            full = full_l[i]
            hit: list[int] = []
            if full:
                hs = hashes_col[i][:full]
                hit = match(hs)
                need = full - len(hit)
                supply = len(bp.free_queue) + len(bp.policy)
                if hit:
                    supply -= evictable_among(hit)
                if need > supply:
                    break
                if hit:
                    touch(hit)
                before = bp.num_evictions
                try:
                    ids = hit + allocate(need)
                except KVNoVictimError:
                    # the policy could not name enough victims now (a structural
                    # constraint); give the hits back and wait for a finish
                    if hit:
                        release(hit)
                    if not running:
                        raise
                    break
                held[i] = ids
                hit_l[i] = len(hit)
                alloc_l[i] = need
                evict_l[i] = bp.num_evictions - before
            waiting.popleft()
            running += 1
            start_s[i] = now
            uncached = lengths[i] - len(hit) * block_size
            seq += 1
            heapq.heappush(events, (now + cost.prefill_s(uncached), _PREFILL_END, seq, i))
            used = bp.num_used
            if used > peak_used:
                peak_used = used
            if running > peak_running:
                peak_running = running

    p = 0
    while p < n or events:
        if events and (p >= n or (events[0][0], events[0][1]) < (arrivals[order[p]], _ARRIVAL)):
            now, kind, _, i = heapq.heappop(events)
            clock.now = now
            if kind == _FINISH:
                ids = held[i]
                if ids:
                    release(ids)
                held[i] = None
                running -= 1
                finish_s[i] = now
                if bar is not None:
                    bar.update(1)
            else:  # prefill end: the KV is written, its full blocks become hittable
                ids = held[i]
                if ids:
                    cache(ids, hashes_col[i][: full_l[i]], hit_l[i])
                prefill_end_s[i] = now
                seq += 1
                heapq.heappush(events, (now + cost.decode_s(outputs[i]), _FINISH, seq, i))
        else:
            i = order[p]
            p += 1
            now = arrivals[i]
            clock.now = now
            full = lengths[i] // block_size
            full_l[i] = full
            if full > capacity:  # can never fit: a miss, never queued
                rejected[i] = True
                if bar is not None:
                    bar.update(1)
            else:
                waiting.append(i)
        if waiting:
            admit(now)
            if len(waiting) > peak_waiting:
                peak_waiting = len(waiting)
            if waiting and not running:  # the head fits an idle pool: unreachable
                raise AssertionError(f"request {waiting[0]} cannot start in an idle pool")
        tl_time.append(now)
        tl_wait.append(len(waiting))
        tl_run.append(running)
        tl_used.append(bp.num_used)
    if bar is not None:
        bar.close()
    return _result(
        table,
        cfg,
        bp,
        capacity=capacity,
        block_size=block_size,
        policy_name=policy_name,
        cols=dict(
            start_s=start_s,
            prefill_end_s=prefill_end_s,
            finish_s=finish_s,
            full_blocks=full_l,
            hit_blocks=hit_l,
            allocated_blocks=alloc_l,
            evicted_blocks=evict_l,
            rejected=rejected,
        ),
        timeline=dict(time_s=tl_time, waiting=tl_wait, running=tl_run, blocks_in_use=tl_used),
        peaks=(peak_used, peak_running, peak_waiting),
    )


def _result(
    table, cfg, bp, *, capacity, block_size, policy_name, cols, timeline, peaks
) -> ConcurrentResult:
    import polars as pl

    arrival = table["arrival_s"].cast(pl.Float64).to_numpy()
    start = np.asarray(cols["start_s"], dtype=np.float64)
    prefill_end = np.asarray(cols["prefill_end_s"], dtype=np.float64)
    finish = np.asarray(cols["finish_s"], dtype=np.float64)
    hit = np.asarray(cols["hit_blocks"], dtype=np.int64)
    full = np.asarray(cols["full_blocks"], dtype=np.int64)
    rejected = np.asarray(cols["rejected"], dtype=bool)
    queue = start - arrival
    ttft = prefill_end - arrival
    lengths = table["input_length"].cast(pl.Int64).to_numpy()
    records = pl.DataFrame(
        {
            "request_id": table["request_id"].cast(pl.Utf8),
            "arrival_s": arrival,
            "start_s": start,
            "queue_s": queue,
            "prefill_end_s": prefill_end,
            "finish_s": finish,
            "ttft_s": ttft,
            "input_length": lengths,
            "output_length": table["output_length"].cast(pl.Int64).to_numpy(),
            "full_blocks": full,
            "hit_blocks": hit,
            "hit_tokens": hit * block_size,
            "allocated_blocks": np.asarray(cols["allocated_blocks"], dtype=np.int64),
            "evicted_blocks": np.asarray(cols["evicted_blocks"], dtype=np.int64),
            "rejected": rejected,
        }
    )
    ran = ~rejected
    n = len(records)
    hit_blocks = int(hit.sum())
    full_blocks = int(full.sum())
    prompt_tokens = int(lengths.sum()) if n else 0
    q = _stats(queue[ran])
    t = _stats(ttft[ran])
    makespan = float(finish[ran].max() - arrival.min()) if ran.any() else 0.0
    return ConcurrentResult(
        capacity_blocks=capacity,
        policy=policy_name,
        block_size=block_size,
        max_num_seqs=cfg.max_num_seqs,
        num_requests=n,
        num_rejected=int(rejected.sum()),
        token_hit_ratio=hit_blocks * block_size / prompt_tokens if prompt_tokens else 0.0,
        block_hit_ratio=hit_blocks / full_blocks if full_blocks else 0.0,
        request_hit_ratio=float((hit > 0).mean()) if n else 0.0,
        hit_blocks=hit_blocks,
        full_blocks=full_blocks,
        prompt_tokens=prompt_tokens,
        evictions=bp.num_evictions,
        peak_blocks_in_use=peaks[0],
        peak_running=peaks[1],
        peak_waiting=peaks[2],
        makespan_s=makespan,
        queue_mean_s=q[0],
        queue_p50_s=q[1],
        queue_p99_s=q[2],
        queue_max_s=q[3],
        ttft_mean_s=t[0],
        ttft_p50_s=t[1],
        ttft_p99_s=t[2],
        ttft_max_s=t[3],
        cost=dataclasses.asdict(cfg.cost),
        records=records,
        timeline=pl.DataFrame(
            {
                k: np.frombuffer(v, dtype=np.float64 if v.typecode == "d" else np.int64)
                for k, v in timeline.items()
            },
            schema={
                "time_s": pl.Float64,
                "waiting": pl.Int64,
                "running": pl.Int64,
                "blocks_in_use": pl.Int64,
            },
        ),
    )
