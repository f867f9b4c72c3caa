"""Prometheus metrics of a pool: ``MetricsCollector`` (the registry side) and
``MetricsHook`` (the pool side).

The hook does the least it can per pool event: it bumps plain ints,
stores timestamps in flat per-block lists and appends observations to
plain lists. Nothing touches
``prometheus_client`` on the hot path: the collector is a custom collector
whose ``collect()`` runs at scrape time, takes the pool's lock, folds the
buffered observations into histogram buckets (numpy, one pass) and reads
the block-state gauges straight from the pool.

Metric names (``prefix`` defaults to ``sagellm_kv``; every series has a
``pool`` label)::

    <prefix>_prefix_cache_queries_total        counter  prompt tokens looked up
    <prefix>_prefix_cache_hits_total           counter  prompt tokens that hit
    <prefix>_prefix_cache_query_blocks_total   counter  full prompt blocks looked up
    <prefix>_prefix_cache_hit_blocks_total     counter  blocks that hit
    <prefix>_prefix_cache_requests_total       counter  lookups (alloc_with_prefix calls)
    <prefix>_prefix_cache_hit_requests_total   counter  lookups with at least one hit block
    <prefix>_allocations_total                 counter  handles allocated
    <prefix>_frees_total                       counter  handles freed
    <prefix>_blocks_cached_total               counter  blocks registered under a hash
    <prefix>_evictions_total{reason,policy}    counter  cached blocks dropped
    <prefix>_cache_usage_ratio                 gauge    used blocks / total blocks
    <prefix>_blocks{state=free|evictable|used} gauge    blocks per state
    <prefix>_capacity_blocks                   gauge    total blocks
    <prefix>_block_lifetime_seconds            histogram  cached -> dropped
    <prefix>_block_idle_before_eviction_seconds histogram last release -> dropped
    <prefix>_block_reuse_gap_seconds           histogram  previous access -> hit

``vllm_compat=True`` adds vLLM's ``vllm:prefix_cache_queries_total`` /
``vllm:prefix_cache_hits_total`` (tokens) and ``vllm:kv_cache_usage_perc``
(labels ``model_name``, ``engine`` = pool), so vLLM's Grafana panels work.

Token hit ratio in PromQL: ``rate(<p>_prefix_cache_hits_total[5m]) /
rate(<p>_prefix_cache_queries_total[5m])``.

Counters are monotonic for the life of the hook: ``pool.reset()`` zeroes the
pool's own ``get_stats()`` counters but not these (Prometheus expects
counters never to go down).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Hashable, Iterable, Sequence
from itertools import pairwise, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from ..errors import KVConfigError
from ..hooks import PoolHook

if TYPE_CHECKING:  # pragma: no cover
    from ..handle import KVHandle

__all__ = ["DEFAULT_SECONDS_BUCKETS", "MetricsCollector", "MetricsHook", "instrument"]

#: Upper bounds (seconds) of the lifetime / idle / reuse-gap histograms: from
#: 1 ms (back-to-back requests) to a day (a simulator replaying a day's trace).
DEFAULT_SECONDS_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    86400.0,
)

#: Reasons the pool reports (``hooks.PoolHook.on_evict``); exported as zero
#: series from the start so rate() queries see them before the first eviction.
EVICTION_REASONS: tuple[str, ...] = ("capacity", "explicit", "clear")

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_FOLD_AT = 16384
_UNKNOWN = float("nan")  # buffered observations per histogram before an eager fold


class _SecondsHistogram:
    """Bucket counts plus buffered observations not yet counted.

    ``values`` buffers single observations. A batch sharing one end time is
    buffered as its start times in ``starts`` and one ``(end, count)`` in
    ``marks``; when ``guards`` is used (one per start), a start counts only
    if it is ``>=`` its guard. The owner extends these lists directly with
    C-level ``map`` over its per-block lists (no Python work per block);
    ``fold`` counts them with one numpy pass and empties them in place, so
    held references stay valid. NaN observations (unknown start) are
    dropped. Not thread-safe: the owner calls everything under one lock (the
    pool's).
    """

    __slots__ = ("bounds", "counts", "guards", "marks", "starts", "sum", "values")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # last: above every bound
        self.sum = 0.0
        self.values: list[float] = []
        self.starts: list[float] = []
        self.marks: list[tuple[float, int]] = []
        self.guards: list[float] = []

    def __len__(self) -> int:
        return len(self.values) + len(self.starts)

    def fold(self) -> None:
        if not self.values and not self.starts:
            return
        values = np.array(self.values, dtype=np.float64)
        if self.starts:
            ends, counts = zip(*self.marks)
            starts = np.array(self.starts, dtype=np.float64)
            batch = np.repeat(np.array(ends, dtype=np.float64), counts) - starts
            if self.guards:
                batch = batch[starts >= np.array(self.guards, dtype=np.float64)]
            values = np.concatenate([values, batch])
        values = values[~np.isnan(values)]
        # side="left": a value equal to a bound counts in that bound's bucket (le)
        idx = np.searchsorted(self.bounds, values, side="left")
        self.counts += np.bincount(idx, minlength=len(self.counts))
        self.sum += float(values.sum())
        self.values.clear()
        self.starts.clear()
        self.marks.clear()
        self.guards.clear()

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(le, count)`` buckets ending with ``+Inf``, and the sum."""
        self.fold()
        cum = np.cumsum(self.counts).tolist()
        buckets = [(floatToGoString(b), c) for b, c in zip(self.bounds.tolist(), cum)]
        buckets.append(("+Inf", cum[-1]))
        return buckets, self.sum


class MetricsHook(PoolHook):
    """Pool hook that counts lookups, allocations and evictions for Prometheus.

    Args:
        collector: the ``MetricsCollector`` to report to (a new one if omitted).
        pool: the ``KVPool`` (or ``BlockPool``) this hook is attached to. With
            it the collector exports the block-state gauges, scrapes take the
            pool's lock (consistent snapshots) and idle times skip blocks still
            in use. Without it only the event-derived series are exported.
        name: value of the ``pool`` label; unique within one collector.
        policy: value of the ``policy`` label (default: the pool's policy name).

    Per-block bookkeeping lives in three flat lists indexed by block id
    (cached-at, last access, last release), sized by the pool's block count.
    Blocks cached before the hook was attached have no known times and add
    no histogram observations.

    Definitions (timestamps are the pool's clock):

    * lifetime: the block's caching -> its hash being dropped (any reason);
    * idle before eviction: the block's last release (the last ``free`` of a
      handle holding it) -> its hash being dropped; only for blocks no handle
      holds at that moment (an ``invalidate`` of a block in use has none);
    * reuse gap: the block's previous access -> a hit, where its caching is
      its first access and each hit is one more (so a block hit once yields
      one gap: caching -> hit).
    """

    __slots__ = (
        "_allocs",
        "_blocks_cached",
        "_cached_at",
        "_evictions",
        "_frees",
        "_growable",
        "_hit_blocks",
        "_hit_requests",
        "_hit_tokens",
        "_idle",
        "_idle_values",
        "_last_access",
        "_last_release",
        "_lifetime",
        "_lifetime_values",
        "_lock",
        "_lookup_pending",
        "_query_blocks",
        "_query_tokens",
        "_refs",
        "_requests",
        "_reuse",
        "_reuse_marks",
        "_reuse_starts",
        "block_pool",
        "collector",
        "name",
        "policy_name",
        "pool",
    )

    def __init__(
        self,
        collector: MetricsCollector | None = None,
        pool: Any = None,
        *,
        name: str = "default",
        policy: str | None = None,
    ) -> None:
        self.collector = MetricsCollector() if collector is None else collector
        self.pool = pool
        self.name = str(name)
        bp = getattr(pool, "block_pool", pool)
        self.block_pool = bp
        self.policy_name = policy or (bp.policy.name if bp is not None else "unknown")
        self._refs = bp.ref_counts if bp is not None else None
        # KVPool calls hooks under its RLock; a scrape takes the same lock
        self._lock = getattr(pool, "_lock", None) or threading.RLock()
        self._requests = self._hit_requests = 0
        self._query_tokens = self._hit_tokens = 0
        self._query_blocks = self._hit_blocks = 0
        self._allocs = self._frees = self._blocks_cached = 0
        self._lookup_pending = False
        self._evictions: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)
        # per-block timestamps, flat lists indexed by block id (NaN: unknown);
        # sized by the pool, or grown on demand when the pool is not known
        n = bp.num_blocks if bp is not None else 0
        self._growable = bp is None
        self._cached_at: list[float] = [_UNKNOWN] * n
        self._last_access: list[float] = [_UNKNOWN] * n
        self._last_release: list[float] = [_UNKNOWN] * n
        buckets = self.collector.buckets
        self._lifetime = _SecondsHistogram(buckets)
        self._idle = _SecondsHistogram(buckets)
        self._reuse = _SecondsHistogram(buckets)
        # the hot path appends straight to the buffers
        self._lifetime_values = self._lifetime.values
        self._idle_values = self._idle.values
        self._reuse_starts = self._reuse.starts
        self._reuse_marks = self._reuse.marks
        self.collector._register_hook(self)

    # -- pool events (hot path: plain ints and C-level batch updates) ---------
    def _grow(self, max_block_id: int) -> None:
        """Pool-less mode: extend the per-block lists to cover ``max_block_id``."""
        n = max(max_block_id + 1, 2 * len(self._cached_at))
        for values in (self._cached_at, self._last_access, self._last_release):
            values.extend(repeat(_UNKNOWN, n - len(values)))

    def on_lookup(
        self,
        request_id: str | None,
        block_ids: Sequence[int],
        num_hit_blocks: int,
        num_blocks: int,
        timestamp: float,
    ) -> None:
        # token counts come with the handle in the on_alloc call that follows
        self._lookup_pending = True
        if num_hit_blocks:
            hits = block_ids[:num_hit_blocks]
            last = self._last_access
            if self._growable:
                self._grow(max(hits))
            if num_hit_blocks == 1:
                self._reuse_starts.append(last[hits[0]])
            else:
                self._reuse_starts.extend(itemgetter(*hits)(last))
            self._reuse_marks.append((timestamp, num_hit_blocks))
            for b in hits:
                last[b] = timestamp

    def on_alloc(self, handle: KVHandle, timestamp: float) -> None:
        self._allocs += 1
        if self._lookup_pending:
            self._lookup_pending = False
            self._requests += 1
            self._query_tokens += handle.num_tokens
            self._query_blocks += len(handle.block_hashes)
            hit = handle.num_cached_tokens
            if hit:
                self._hit_requests += 1
                self._hit_tokens += hit
                self._hit_blocks += hit // handle.block_size
            if len(self._reuse) > _FOLD_AT:
                self._reuse.fold()

    def on_free(self, handle: KVHandle, timestamp: float) -> None:
        self._frees += 1
        ids = handle.block_ids
        if self._growable and ids:
            self._grow(max(ids))
        released = self._last_release
        for b in ids:
            released[b] = timestamp
        if len(self._lifetime) > _FOLD_AT:
            self._lifetime.fold()
            self._idle.fold()

    def on_block_cached(
        self, block_id: int, block_hash: Hashable, parent_hash: Hashable | None, timestamp: float
    ) -> None:
        self._blocks_cached += 1
        if self._growable and block_id >= len(self._cached_at):
            self._grow(block_id)
        # overwritten, never cleared: a block is cached again before it can be evicted again
        self._cached_at[block_id] = timestamp
        self._last_access[block_id] = timestamp

    def on_evict(self, block_id: int, block_hash: Hashable, reason: str, timestamp: float) -> None:
        try:
            self._evictions[reason] += 1
        except KeyError:
            self._evictions[reason] = 1
        if block_id >= len(self._cached_at):  # pool-less mode, cached before attach
            return
        # NaN (cached before this hook was attached) is dropped when folded
        self._lifetime_values.append(timestamp - self._cached_at[block_id])
        released = self._last_release[block_id]
        # idle only if released after its last access and no handle holds it now
        if released >= self._last_access[block_id] and not (self._refs and self._refs[block_id]):
            self._idle_values.append(timestamp - released)

    def on_blocks_cached(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[Hashable],
        parent_hash: Hashable | None,
        timestamp: float,
    ) -> None:
        self._blocks_cached += len(block_ids)
        if self._growable:
            self._grow(max(block_ids))
        cached_at = self._cached_at
        last = self._last_access
        for b in block_ids:
            cached_at[b] = timestamp
            last[b] = timestamp

    def on_evict_many(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[Hashable],
        reason: str,
        timestamp: float,
    ) -> None:
        n = len(block_ids)
        try:
            self._evictions[reason] += n
        except KeyError:
            self._evictions[reason] = n
        if not n:
            return
        if self._growable:  # pool-less mode: blocks cached before attach stay unknown (NaN)
            self._grow(max(block_ids))
        # the observations are deferred to the fold: start times and guards gathered
        # by C-level map, one (end, count) mark per batch
        self._lifetime.starts.extend(map(self._cached_at.__getitem__, block_ids))
        self._lifetime.marks.append((timestamp, n))
        idle = self._idle
        released: Iterable[float] = map(self._last_release.__getitem__, block_ids)
        refs = self._refs
        # victims of "capacity" are unreferenced by construction; an explicit drop
        # (invalidate) may hit a block in use, which has no idle time
        if refs and reason != "capacity" and any(map(refs.__getitem__, block_ids)):
            released = [_UNKNOWN if refs[b] else r for b, r in zip(block_ids, released)]
        idle.starts.extend(released)
        idle.guards.extend(map(self._last_access.__getitem__, block_ids))
        idle.marks.append((timestamp, n))

    def on_cleared(self, timestamp: float) -> None:
        # every hash is gone; counters and histograms keep their history
        for values in (self._cached_at, self._last_access, self._last_release):
            values[:] = repeat(_UNKNOWN, len(values))
        self._lookup_pending = False

    # -- scrape side ---------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Counters, histograms and (with a pool) block states, read consistently.

        Returns:
            a new dict: counter name -> int, ``"evictions"`` reason -> int,
            histogram name -> ``(cumulative buckets, sum)``, and when the pool
            is known ``"blocks"`` state -> int and ``"capacity_blocks"``.
        """
        with self._lock:
            out: dict[str, Any] = {
                "prefix_cache_queries": self._query_tokens,
                "prefix_cache_hits": self._hit_tokens,
                "prefix_cache_query_blocks": self._query_blocks,
                "prefix_cache_hit_blocks": self._hit_blocks,
                "prefix_cache_requests": self._requests,
                "prefix_cache_hit_requests": self._hit_requests,
                "allocations": self._allocs,
                "frees": self._frees,
                "blocks_cached": self._blocks_cached,
                "evictions": dict(self._evictions),
                "block_lifetime_seconds": self._lifetime.snapshot(),
                "block_idle_before_eviction_seconds": self._idle.snapshot(),
                "block_reuse_gap_seconds": self._reuse.snapshot(),
            }
            bp = self.block_pool
            if bp is not None:
                out["capacity_blocks"] = bp.num_blocks
                out["blocks"] = {
                    "free": bp.num_free,
                    "evictable": bp.num_evictable,
                    "used": bp.num_used,
                }
            return out

    def __repr__(self) -> str:
        return f"MetricsHook(pool={self.name!r}, policy={self.policy_name!r})"


_COUNTERS: tuple[tuple[str, str], ...] = (
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("prefix_cache_query_blocks", "Full prompt blocks looked up in the prefix cache."),
    ("prefix_cache_hit_blocks", "Prompt blocks found in the prefix cache."),
    ("prefix_cache_requests", "Prefix-cache lookups (requests)."),
    ("prefix_cache_hit_requests", "Prefix-cache lookups with at least one hit block."),
    ("allocations", "KV handles allocated."),
    ("frees", "KV handles freed."),
    ("blocks_cached", "Blocks registered in the prefix cache under a hash."),
)
_HISTOGRAMS: tuple[tuple[str, str], ...] = (
    ("block_lifetime_seconds", "Seconds from a block's caching to its hash being dropped."),
    (
        "block_idle_before_eviction_seconds",
        "Seconds from a block's last release to its hash being dropped.",
    ),
    (
        "block_reuse_gap_seconds",
        "Seconds from a cached block's previous access (caching or hit) to a hit.",
    ),
)


class MetricsCollector:
    """Prometheus metrics of one or more pools, on a registry of its own.

    Args:
        prefix: metric name prefix (``sagellm_kv`` -> ``sagellm_kv_evictions_total``).
        registry: registry to register on; default a new ``CollectorRegistry``
            (never the process-global one, so pools and tests do not collide).
        buckets: histogram upper bounds in seconds (increasing).
        vllm_compat: also export vLLM's prefix-cache names (module doc).
        model_name: ``model_name`` label of those series.

    Attach pools with ``MetricsHook(collector, pool, name=...)`` or
    ``instrument(pool, collector, name=...)``; each gets its ``pool`` label.
    """

    def __init__(
        self,
        prefix: str = "sagellm_kv",
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float] = DEFAULT_SECONDS_BUCKETS,
        vllm_compat: bool = False,
        model_name: str = "sagellm",
    ) -> None:
        self.vllm_compat = bool(vllm_compat)
        self.model_name = str(model_name)
        if not isinstance(prefix, str) or not _NAME_RE.match(prefix):
            raise KVConfigError(f"metric prefix {prefix!r} is not a valid Prometheus name")
        bounds = [float(b) for b in buckets]
        if not bounds or any(b <= a for a, b in pairwise(bounds)) or not np.isfinite(bounds).all():
            raise KVConfigError(
                f"buckets must be finite, strictly increasing and non-empty, got {buckets!r}"
            )
        self.prefix = prefix
        self.buckets: tuple[float, ...] = tuple(bounds)
        self._hooks: dict[str, MetricsHook] = {}
        self._hooks_lock = threading.Lock()
        self.registry = CollectorRegistry() if registry is None else registry
        self.registry.register(self)

    @property
    def hooks(self) -> dict[str, MetricsHook]:
        """``pool`` label -> hook (a copy)."""
        with self._hooks_lock:
            return dict(self._hooks)

    def _register_hook(self, hook: MetricsHook) -> None:
        with self._hooks_lock:
            if hook.name in self._hooks:
                raise KVConfigError(
                    f"a pool named {hook.name!r} already reports to this collector; "
                    "give each pool its own name"
                )
            self._hooks[hook.name] = hook

    def remove(self, name: str) -> MetricsHook:
        """Stop exporting the pool ``name`` (detach its hook from the pool yourself)."""
        with self._hooks_lock:
            try:
                return self._hooks.pop(name)
            except KeyError:
                raise KVConfigError(f"no pool named {name!r} in this collector") from None

    # -- prometheus_client collector protocol --------------------------------
    def _families(self) -> dict[str, Any]:
        p = self.prefix
        fams: dict[str, Any] = {}
        for key, doc in _COUNTERS:
            fams[key] = CounterMetricFamily(f"{p}_{key}", doc, labels=["pool"])
        fams["evictions"] = CounterMetricFamily(
            f"{p}_evictions",
            "Cached blocks dropped from the prefix cache, by reason.",
            labels=["pool", "reason", "policy"],
        )
        fams["cache_usage_ratio"] = GaugeMetricFamily(
            f"{p}_cache_usage_ratio", "Blocks in use / total blocks.", labels=["pool"]
        )
        fams["blocks"] = GaugeMetricFamily(
            f"{p}_blocks", "Blocks per state (free, evictable, used).", labels=["pool", "state"]
        )
        fams["capacity_blocks"] = GaugeMetricFamily(
            f"{p}_capacity_blocks", "Total blocks of the pool.", labels=["pool"]
        )
        for key, doc in _HISTOGRAMS:
            fams[key] = HistogramMetricFamily(f"{p}_{key}", doc, labels=["pool"])
        if self.vllm_compat:
            vl = ["model_name", "engine"]
            fams["vllm_q"] = CounterMetricFamily(
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                labels=vl,
            )
            fams["vllm_h"] = CounterMetricFamily(
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                labels=vl,
            )
            fams["vllm_u"] = GaugeMetricFamily(
                "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=vl
            )
        return fams

    def describe(self) -> Iterable[Any]:
        """Metric families without samples (the registry checks names with it)."""
        return list(self._families().values())

    def collect(self) -> Iterable[Any]:
        """Scrape time: snapshot every attached pool and build the families."""
        fams = self._families()
        for name, hook in self.hooks.items():
            snap = hook.snapshot()
            for key, _ in _COUNTERS:
                fams[key].add_metric([name], snap[key])
            for reason, n in snap["evictions"].items():
                fams["evictions"].add_metric([name, reason, hook.policy_name], n)
            for key, _ in _HISTOGRAMS:
                buckets, total = snap[key]
                fams[key].add_metric([name], buckets, total)
            if self.vllm_compat:
                vl = [self.model_name, name]
                fams["vllm_q"].add_metric(vl, snap["prefix_cache_queries"])
                fams["vllm_h"].add_metric(vl, snap["prefix_cache_hits"])
            if "blocks" in snap:
                blocks, cap = snap["blocks"], snap["capacity_blocks"]
                if self.vllm_compat:
                    fams["vllm_u"].add_metric([self.model_name, name], blocks["used"] / cap)
                fams["cache_usage_ratio"].add_metric([name], blocks["used"] / cap)
                fams["capacity_blocks"].add_metric([name], cap)
                for state, n in blocks.items():
                    fams["blocks"].add_metric([name, state], n)
        return list(fams.values())

    # -- exposition ----------------------------------------------------------
    def render(self) -> str:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry).decode("utf-8")

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value by full name (``<prefix>_evictions_total``) and labels."""
        return self.registry.get_sample_value(name, labels or {})

    def __repr__(self) -> str:
        return f"MetricsCollector(prefix={self.prefix!r}, pools={sorted(self.hooks)})"


def instrument(
    pool: Any, collector: MetricsCollector | None = None, name: str = "default"
) -> MetricsCollector:
    """Attach a ``MetricsHook`` for ``pool`` and return the collector.

    Example::

        collector = instrument(pool, name="gpu0")
        print(collector.render())
    """
    collector = MetricsCollector() if collector is None else collector
    hook = MetricsHook(collector, pool, name=name)
    add_hook = getattr(pool, "add_hook", None)
    if add_hook is not None:
        add_hook(hook)
    else:  # a bare BlockPool
        pool.hooks.append(hook)
    return collector
