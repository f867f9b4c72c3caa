"""``MetricsHook``: the pool side of the Prometheus metrics (see :mod:`.metrics`).

The hook does the least it can per pool event: it bumps plain ints, stores
timestamps in flat per-block lists and buffers histogram observations as
start times gathered with C-level ``map`` (no Python work per block);
nothing touches ``prometheus_client`` on the hot path. The buffers are
counted at scrape time (``snapshot``), under the pool's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from itertools import repeat
from operator import itemgetter
from typing import Any

from ..hooks import PoolHook
from .histogram import SecondsHistogram
from .metrics import MetricsCollector

__all__ = ["EVICTION_REASONS", "MetricsHook", "instrument"]

#: Reasons the pool reports (``hooks.PoolHook.on_evict``); exported as zero
#: series from the start so rate() queries see them before the first eviction.
EVICTION_REASONS: tuple[str, ...] = ("capacity", "explicit", "clear")


def _one(block_id: int) -> Callable[[list[float]], tuple[float]]:
    """``itemgetter`` of one index that still returns a tuple."""
    return lambda values: (values[block_id],)


_FOLD_AT = 16384  # buffered observations per histogram before an eager fold
_UNKNOWN = float("nan")


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
        self._lifetime = SecondsHistogram(buckets)
        self._idle = SecondsHistogram(buckets)
        self._reuse = SecondsHistogram(buckets)
        # the hot path appends straight to the buffers
        self._lifetime_values = self._lifetime.values
        self._idle_values = self._idle.values
        self.collector.register_hook(self)

    # -- pool events (hot path: plain ints and C-level batch updates) ---------
    def _grow(self, max_block_id: int) -> None:
        """Pool-less mode: extend the per-block lists to cover ``max_block_id``."""
        n = max(max_block_id + 1, 2 * len(self._cached_at))
        for values in (self._cached_at, self._last_access, self._last_release):
            values.extend(repeat(_UNKNOWN, n - len(values)))

    def on_lookup(self, request_id, block_ids, num_hit_blocks, num_blocks, timestamp) -> None:
        # token counts come with the handle in the on_alloc call that follows
        self._lookup_pending = True
        if num_hit_blocks:
            hits = block_ids[:num_hit_blocks]
            last = self._last_access
            if self._growable:
                self._grow(max(hits))
            get = itemgetter(*hits) if num_hit_blocks > 1 else _one(hits[0])
            self._reuse.add_batch(timestamp, get(last))
            for b in hits:
                last[b] = timestamp

    def on_alloc(self, handle, timestamp) -> None:
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

    def on_free(self, handle, timestamp) -> None:
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

    def on_block_cached(self, block_id, block_hash, parent_hash, timestamp) -> None:
        self._blocks_cached += 1
        if self._growable and block_id >= len(self._cached_at):
            self._grow(block_id)
        # overwritten, never cleared: a block is cached again before it can be evicted again
        self._cached_at[block_id] = timestamp
        self._last_access[block_id] = timestamp

    def on_evict(self, block_id, block_hash, reason, timestamp) -> None:
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

    def on_blocks_cached(self, block_ids, block_hashes, parent_hash, timestamp) -> None:
        self._blocks_cached += len(block_ids)
        if self._growable:
            self._grow(max(block_ids))
        cached_at = self._cached_at
        last = self._last_access
        for b in block_ids:
            cached_at[b] = timestamp
            last[b] = timestamp

    def on_evict_many(self, block_ids, block_hashes, reason, timestamp) -> None:
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
        # by one C-level getter (a batch of equal starts is one run)
        get = itemgetter(*block_ids) if n > 1 else _one(block_ids[0])
        self._lifetime.add_batch(timestamp, get(self._cached_at))
        released = get(self._last_release)
        refs = self._refs
        # victims of "capacity" are unreferenced by construction; an explicit drop
        # (invalidate) may hit a block in use, which has no idle time
        if refs and reason != "capacity" and any(map(refs.__getitem__, block_ids)):
            released = [_UNKNOWN if refs[b] else r for b, r in zip(block_ids, released)]
        self._idle.add_batch(timestamp, released, get(self._last_access))

    def on_cleared(self, timestamp) -> None:
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
