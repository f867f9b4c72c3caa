"""Prometheus figures of a ``VLLMEventSubscriber`` (what ``sage-kv-stats listen`` serves).

Metric names (``prefix`` defaults to ``sagellm_kv_events``; ``endpoint`` label)::

    <prefix>_batches_total                      counter  batches applied
    <prefix>_events_total                       counter  events applied
    <prefix>_garbage_frames_total               counter  frames counted and skipped
    <prefix>_duplicate_batches_total            counter  live copies of replayed batches
    <prefix>_gaps_total{outcome}                counter  holes, outcome=repaired|unrecovered
    <prefix>_replayed_batches_total             counter  batches applied from the replay socket
    <prefix>_publisher_restarts_total           counter  sequence restarts seen
    <prefix>_last_seq                           gauge    newest applied sequence number
    <prefix>_shadow_blocks{rank,medium}         gauge    hashes the engine holds, per rank/medium
    <prefix>_stored_blocks_total                counter  hashes stored (new to the shadow)
    <prefix>_removed_blocks_total               counter  hashes removed
    <prefix>_implied_prefix_cache_queries_total counter  tokens of stored chains incl. held parents
    <prefix>_implied_prefix_cache_hits_total    counter  tokens of held parents (see shadow.py)

The "implied" pair is what events can tell (``shadow.ShadowCache``), not the
engine's own ``vllm:prefix_cache_*`` counters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from .metrics import check_metric_prefix

__all__ = ["SubscriberCollector"]


class SubscriberCollector:
    """Custom collector over subscribers, on a registry of its own.

    Args:
        subscribers: the ``VLLMEventSubscriber`` objects to export.
        prefix: metric name prefix.
        registry: registry to register on (default a new one, never the global).
    """

    def __init__(
        self,
        subscribers: Iterable[Any],
        prefix: str = "sagellm_kv_events",
        registry: CollectorRegistry | None = None,
    ) -> None:
        check_metric_prefix(prefix)
        self.subscribers = list(subscribers)
        self.prefix = prefix
        self.registry = CollectorRegistry() if registry is None else registry
        self.registry.register(self)

    def describe(self) -> Iterable[Any]:
        return self._build(with_samples=False)

    def collect(self) -> Iterable[Any]:
        return self._build(with_samples=True)

    def _build(self, *, with_samples: bool) -> list[Any]:
        p = self.prefix
        counters = {
            "batches": ("num_batches", "Batches applied."),
            "events": ("num_events", "Events applied."),
            "garbage_frames": ("num_garbage", "Frames that were not valid batches (skipped)."),
            "duplicate_batches": ("num_duplicates", "Live copies of batches already replayed."),
            "replayed_batches": ("num_replayed_batches", "Batches applied from the replay socket."),
            "publisher_restarts": ("num_restarts", "Publisher sequence restarts seen."),
        }
        shadow_counters = {
            "stored_blocks": ("stored_blocks", "Block hashes stored (new to the shadow)."),
            "removed_blocks": ("removed_blocks", "Block hashes removed."),
            "implied_prefix_cache_queries": (
                "implied_query_tokens",
                "Tokens of stored chains including their held parents (event-implied).",
            ),
            "implied_prefix_cache_hits": (
                "implied_hit_tokens",
                "Tokens of held parents of stored chains (event-implied reuse).",
            ),
        }
        fams: dict[str, Any] = {}
        for key, (_, doc) in {**counters, **shadow_counters}.items():
            fams[key] = CounterMetricFamily(f"{p}_{key}", doc, labels=["endpoint"])
        fams["gaps"] = CounterMetricFamily(
            f"{p}_gaps", "Sequence holes, by outcome.", labels=["endpoint", "outcome"]
        )
        fams["last_seq"] = GaugeMetricFamily(
            f"{p}_last_seq", "Newest applied sequence number.", labels=["endpoint"]
        )
        fams["shadow_blocks"] = GaugeMetricFamily(
            f"{p}_shadow_blocks",
            "Block hashes the engine holds per data-parallel rank and medium.",
            labels=["endpoint", "rank", "medium"],
        )
        if with_samples:
            for sub in self.subscribers:
                ep = sub.endpoint
                for key, (attr, _) in counters.items():
                    fams[key].add_metric([ep], getattr(sub, attr))
                sh = sub.shadow
                with sh.lock:
                    for key, (attr, _) in shadow_counters.items():
                        fams[key].add_metric([ep], getattr(sh, attr))
                fams["gaps"].add_metric([ep, "repaired"], sub.num_gaps_repaired)
                fams["gaps"].add_metric([ep, "unrecovered"], sub.num_gaps_unrecovered)
                fams["last_seq"].add_metric([ep], -1 if sub.last_seq is None else sub.last_seq)
                for (endpoint, rank, medium), n in sh.sizes().items():
                    if endpoint == ep:
                        fams["shadow_blocks"].add_metric([ep, str(rank), str(medium)], n)
        return list(fams.values())

    def render(self) -> str:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry).decode("utf-8")
