"""Prometheus metrics: exact counter / gauge / histogram values after known operations."""

from __future__ import annotations

import urllib.request

import pytest
from conftest import make_pool
from prometheus_client.parser import text_string_to_metric_families

from sagellm_kv_cache.errors import KVConfigError
from sagellm_kv_cache.observability import (
    MetricsCollector,
    MetricsHook,
    instrument,
    start_metrics_server,
)


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value of a text exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def run_scenario(pool, clock: ManualClock) -> None:
    """A: 3 blocks cached, freed; B: hits A's first 2 blocks, caches 2; C: 6 fresh
    blocks (3 free + 3 evicted); then one explicit eviction.

    block ids   A: [0, 1, 2]   B: [0, 1, 3, 4]   C: [5, 6, 7, 2, 4, 3]
    LRU order after B's free: 2 (A's tail), 4, 3, 1, 0 -> C evicts 2, 4, 3; evict(1) takes 1
    """
    a_tokens = list(range(12))
    a, hit = pool.alloc_with_prefix(a_tokens)  # t=0
    assert (a.block_ids, hit) == ([0, 1, 2], 0)
    pool.cache_blocks(a)
    clock.now = 1.0
    pool.free(a)
    clock.now = 2.0
    b, hit = pool.alloc_with_prefix(a_tokens[:8] + list(range(100, 108)))
    assert (b.block_ids, hit) == ([0, 1, 3, 4], 8)
    pool.cache_blocks(b)
    clock.now = 3.0
    pool.free(b)
    clock.now = 4.0
    c, hit = pool.alloc_with_prefix(list(range(200, 224)))
    assert (c.block_ids, hit) == ([5, 6, 7, 2, 4, 3], 0)
    clock.now = 5.0
    assert pool.evict(1) == [1]


def test_scrape_over_http_gives_exact_values():
    clock = ManualClock()
    pool = make_pool(num_blocks=8, block_size=4, clock=clock)
    collector = instrument(pool, name="gpu0")
    run_scenario(pool, clock)

    server = start_metrics_server(0, "127.0.0.1", registry=collector.registry)
    try:
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    finally:
        server.shutdown()

    s = parse(text)
    p = {"pool": "gpu0"}
    assert sample(s, "sagellm_kv_prefix_cache_queries_total", **p) == 12 + 16 + 24
    assert sample(s, "sagellm_kv_prefix_cache_hits_total", **p) == 8
    assert sample(s, "sagellm_kv_prefix_cache_query_blocks_total", **p) == 3 + 4 + 6
    assert sample(s, "sagellm_kv_prefix_cache_hit_blocks_total", **p) == 2
    assert sample(s, "sagellm_kv_prefix_cache_requests_total", **p) == 3
    assert sample(s, "sagellm_kv_prefix_cache_hit_requests_total", **p) == 1
    assert sample(s, "sagellm_kv_allocations_total", **p) == 3
    assert sample(s, "sagellm_kv_frees_total", **p) == 2
    assert sample(s, "sagellm_kv_blocks_cached_total", **p) == 5
    ev = {"pool": "gpu0", "policy": "lru"}
    assert sample(s, "sagellm_kv_evictions_total", reason="capacity", **ev) == 3
    assert sample(s, "sagellm_kv_evictions_total", reason="explicit", **ev) == 1
    assert sample(s, "sagellm_kv_evictions_total", reason="clear", **ev) == 0
    # C holds 6 blocks; block 1 went to the free queue, block 0 is still cached
    assert sample(s, "sagellm_kv_cache_usage_ratio", **p) == 0.75
    assert sample(s, "sagellm_kv_blocks", state="used", **p) == 6
    assert sample(s, "sagellm_kv_blocks", state="free", **p) == 1
    assert sample(s, "sagellm_kv_blocks", state="evictable", **p) == 1
    assert sample(s, "sagellm_kv_capacity_blocks", **p) == 8

    # lifetimes: block 2 0->4, 4 and 3 2->4, 1 0->5
    life = "sagellm_kv_block_lifetime_seconds"
    assert sample(s, f"{life}_count", **p) == 4
    assert sample(s, f"{life}_sum", **p) == 4 + 2 + 2 + 5
    assert sample(s, f"{life}_bucket", le="1.0", **p) == 0
    assert sample(s, f"{life}_bucket", le="2.5", **p) == 2
    assert sample(s, f"{life}_bucket", le="5.0", **p) == 4
    # idle: block 2 released at 1 -> 4; 4 and 3 released at 3 -> 4; 1 released at 3 -> 5
    idle = "sagellm_kv_block_idle_before_eviction_seconds"
    assert sample(s, f"{idle}_count", **p) == 4
    assert sample(s, f"{idle}_sum", **p) == 3 + 1 + 1 + 2
    assert sample(s, f"{idle}_bucket", le="1.0", **p) == 2  # le is inclusive
    assert sample(s, f"{idle}_bucket", le="2.5", **p) == 3
    # reuse gaps: blocks 0 and 1 cached at 0, hit at 2
    gap = "sagellm_kv_block_reuse_gap_seconds"
    assert sample(s, f"{gap}_count", **p) == 2
    assert sample(s, f"{gap}_sum", **p) == 4
    assert sample(s, f"{gap}_bucket", le="1.0", **p) == 0
    assert sample(s, f"{gap}_bucket", le="2.5", **p) == 2
    assert sample(s, f"{gap}_bucket", le="+Inf", **p) == 2


def test_counters_agree_with_pool_stats():
    pool = make_pool(num_blocks=8, block_size=4)
    collector = instrument(pool)
    run_scenario(pool, ManualClock())
    stats = pool.get_stats()
    get = collector.get_sample_value
    lbl = {"pool": "default"}
    assert get("sagellm_kv_prefix_cache_queries_total", lbl) == stats["prefix_query_tokens"]
    assert get("sagellm_kv_prefix_cache_hits_total", lbl) == stats["prefix_hit_tokens"]
    assert get("sagellm_kv_prefix_cache_query_blocks_total", lbl) == stats["prefix_query_blocks"]
    assert get("sagellm_kv_allocations_total", lbl) == stats["num_allocs"]
    assert get("sagellm_kv_frees_total", lbl) == stats["num_frees"]
    assert get("sagellm_kv_cache_usage_ratio", lbl) == stats["usage"]


def test_invalidate_of_block_in_use_has_lifetime_but_no_idle_time():
    clock = ManualClock()
    pool = make_pool(clock=clock)
    collector = instrument(pool)
    h, _ = pool.alloc_with_prefix(list(range(8)))
    pool.cache_blocks(h)
    clock.now = 7.0
    assert pool.invalidate(h.block_hashes) == 2
    get = collector.get_sample_value
    lbl = {"pool": "default"}
    assert get("sagellm_kv_evictions_total", {**lbl, "reason": "explicit", "policy": "lru"}) == 2
    assert get("sagellm_kv_block_lifetime_seconds_sum", lbl) == 14.0
    assert get("sagellm_kv_block_idle_before_eviction_seconds_count", lbl) == 0


def test_reset_keeps_counters_monotonic():
    pool = make_pool()
    collector = instrument(pool)
    h, _ = pool.alloc_with_prefix(list(range(8)))
    pool.cache_blocks(h)
    pool.reset()
    get = collector.get_sample_value
    assert get("sagellm_kv_prefix_cache_queries_total", {"pool": "default"}) == 8
    assert get("sagellm_kv_blocks", {"pool": "default", "state": "free"}) == 8
    h, _ = pool.alloc_with_prefix(list(range(8)))  # cache empty after reset: no hit
    assert get("sagellm_kv_prefix_cache_queries_total", {"pool": "default"}) == 16
    assert get("sagellm_kv_prefix_cache_hits_total", {"pool": "default"}) == 0


def test_registries_are_independent():
    c1 = MetricsCollector()
    c2 = MetricsCollector()
    assert c1.registry is not c2.registry
    p1, p2 = make_pool(), make_pool()
    p1.add_hook(MetricsHook(c1, p1))
    p2.add_hook(MetricsHook(c2, p2))
    p1.alloc_with_prefix(list(range(8)))
    lbl = {"pool": "default"}
    assert c1.get_sample_value("sagellm_kv_prefix_cache_queries_total", lbl) == 8
    assert c2.get_sample_value("sagellm_kv_prefix_cache_queries_total", lbl) == 0
    assert c2.get_sample_value("sagellm_kv_blocks", {**lbl, "state": "used"}) == 0
    assert c1.get_sample_value("sagellm_kv_blocks", {**lbl, "state": "used"}) == 2


def test_global_registry_untouched():
    from prometheus_client import REGISTRY

    MetricsCollector(prefix="sagellm_kv_global_check")
    assert REGISTRY.get_sample_value("sagellm_kv_global_check_frees_total", {"pool": "x"}) is None
    names = {m.name for m in REGISTRY.collect()}
    assert not any(n.startswith("sagellm_kv_global_check") for n in names)


def test_two_pools_in_one_collector_and_prefix():
    collector = MetricsCollector(prefix="engine_kv")
    p1, p2 = make_pool(), make_pool()
    instrument(p1, collector, name="a")
    instrument(p2, collector, name="b")
    p2.alloc_with_prefix(list(range(12)))
    s = parse(collector.render())
    assert sample(s, "engine_kv_prefix_cache_queries_total", pool="a") == 0
    assert sample(s, "engine_kv_prefix_cache_queries_total", pool="b") == 12
    assert sample(s, "engine_kv_blocks", pool="b", state="used") == 3
    with pytest.raises(KVConfigError):
        instrument(make_pool(), collector, name="a")
    assert collector.remove("a").name == "a"
    assert ("engine_kv_frees_total", frozenset({"pool": "a"}.items())) not in parse(
        collector.render()
    )


def test_same_prefix_twice_on_one_registry_is_refused():
    c1 = MetricsCollector()
    with pytest.raises(ValueError, match="Duplicated"):
        MetricsCollector(registry=c1.registry)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prefix": "bad-name"},
        {"prefix": ""},
        {"buckets": []},
        {"buckets": [1.0, 1.0]},
        {"buckets": [2.0, 1.0]},
        {"buckets": [1.0, float("inf")]},
    ],
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(KVConfigError):
        MetricsCollector(**kwargs)


def test_server_needs_an_explicit_registry():
    with pytest.raises(KVConfigError):
        start_metrics_server(0, registry=None)
    with pytest.raises(KVConfigError):
        start_metrics_server(-1, registry=MetricsCollector())


def test_hook_without_pool_exports_events_but_no_gauges():
    clock = ManualClock()
    collector = MetricsCollector()
    pool = make_pool(clock=clock)
    pool.add_hook(MetricsHook(collector, name="bare"))
    h, _ = pool.alloc_with_prefix(list(range(8)))
    pool.cache_blocks(h)
    clock.now = 1.0
    pool.free(h)
    clock.now = 3.0
    h2, hit = pool.alloc_with_prefix(list(range(8)))
    assert hit == 8
    clock.now = 4.0
    pool.invalidate(h2.block_hashes)  # in use: hit at 3 after the release at 1
    s = parse(collector.render())
    assert sample(s, "sagellm_kv_prefix_cache_hits_total", pool="bare") == 8
    assert sample(s, "sagellm_kv_block_reuse_gap_seconds_sum", pool="bare") == 3 + 3
    assert sample(s, "sagellm_kv_block_lifetime_seconds_sum", pool="bare") == 4 + 4
    assert sample(s, "sagellm_kv_block_idle_before_eviction_seconds_count", pool="bare") == 0
    assert (
        sample(s, "sagellm_kv_evictions_total", pool="bare", reason="explicit", policy="unknown")
        == 2
    )
    assert not any(name == "sagellm_kv_blocks" for name, _ in s)
