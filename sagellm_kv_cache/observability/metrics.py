"""Prometheus metrics of a pool: ``MetricsCollector`` (the registry side; the pool
side is ``metrics_hook.MetricsHook``).

The collector is a custom collector whose ``collect()`` runs at scrape time:
it asks every attached hook for a snapshot (taken under the pool's lock,
folding the buffered observations into histogram buckets) and reads the
block-state gauges straight from the pool.

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
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest

from ..errors import KVConfigError
from .histogram import DEFAULT_SECONDS_BUCKETS

if TYPE_CHECKING:  # pragma: no cover
    from .metrics_hook import MetricsHook

__all__ = ["DEFAULT_SECONDS_BUCKETS", "MetricsCollector", "check_metric_prefix"]

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def check_metric_prefix(prefix: object) -> str:
    """``prefix`` if it is a valid Prometheus metric name, else ``KVConfigError``."""
    if not isinstance(prefix, str) or not _NAME_RE.match(prefix):
        raise KVConfigError(f"metric prefix {prefix!r} is not a valid Prometheus name")
    return prefix


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
        check_metric_prefix(prefix)
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

    def register_hook(self, hook: MetricsHook) -> None:
        """Export ``hook``'s pool under its name (``MetricsHook`` calls this itself)."""
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
