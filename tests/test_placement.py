"""LoadAwareScheduler / LoadMetricsCollector on real (metadata-only) KVPools: exact choices."""

from __future__ import annotations

import pytest

from sagellm_kv_cache import (
    DeviceLoadMetrics,
    KVConfigError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVPool,
    LoadAwareScheduler,
    LoadMetricsCollector,
    PlacementStrategy,
    SchedulerRequest,
)

BS = 4


def make_pool(num_blocks: int = 16) -> KVPool:
    return KVPool(num_blocks=num_blocks, block_size=BS, metadata_only=True)


def cache(pool: KVPool, hashes: list, *, keep: bool = False):
    """A request that wrote ``hashes`` (cached); freed unless ``keep``."""
    h, _ = pool.alloc_with_prefix(block_hashes=hashes, num_tokens=len(hashes) * BS)
    pool.cache_blocks(h)
    if not keep:
        pool.free(h)
    return h


def make_fleet(n: int = 3, num_blocks: int = 16) -> tuple[LoadMetricsCollector, list[KVPool]]:
    c = LoadMetricsCollector()
    pools = [make_pool(num_blocks) for _ in range(n)]
    for k, p in enumerate(pools):
        c.attach_pool(f"d{k}", p)
    return c, pools


DEVS = ["d0", "d1", "d2"]


def test_seed_metrics_examples():
    m = DeviceLoadMetrics.create("cuda:0", kv_tokens_capacity=4096)
    m.update_kv_usage(1024)
    assert m.kv_utilization() == 0.25 and m.available_kv_tokens() == 3072
    m.update_request_count(5, 2)
    assert m.total_requests() == 7
    m2 = DeviceLoadMetrics.create("cuda:0", memory_capacity_mb=8192)
    m2.update_memory_usage(4096)
    assert m2.memory_utilization() == 0.5
    m3 = DeviceLoadMetrics.create("cuda:0", kv_tokens_capacity=1000)
    m3.update_kv_usage(950)
    assert m3.is_overloaded(kv_threshold=0.9) and not m.is_overloaded()
    assert "device" in m.to_dict()
    c = LoadMetricsCollector()
    c.register_device("cuda:0", kv_tokens_capacity=4096)
    c.register_device("cuda:1")
    assert c.list_devices() == ["cuda:0", "cuda:1"]
    c.unregister_device("cuda:1")
    assert c.list_devices() == ["cuda:0"]
    c.reset()
    assert c.list_devices() == []


def test_collector_reads_pool_stats():
    c, pools = make_fleet(2, num_blocks=10)
    h = cache(pools[0], [1, 2, 3], keep=True)
    c.refresh()
    m = c.get_metrics("d0")
    assert (m.kv_tokens_capacity, m.kv_tokens_used, m.block_size) == (40, 12, BS)
    assert m.kv_blocks_used() == 3 and c.get_metrics("d1").kv_tokens_used == 0
    pools[0].free(h)
    c.refresh(["d0"])
    assert c.get_metrics("d0").kv_tokens_used == 0


def test_round_robin_and_disabled_awareness():
    c, _ = make_fleet()
    s = LoadAwareScheduler(c, PlacementStrategy.ROUND_ROBIN)
    assert [s.select_device(DEVS) for _ in range(5)] == ["d0", "d1", "d2", "d0", "d1"]
    off = LoadAwareScheduler(c, "lowest_kv", enable_load_awareness=False)
    assert not off.is_enabled()
    assert [off.select_device(DEVS) for _ in range(4)] == ["d0", "d1", "d2", "d0"]
    assert s.get_placement_stats() == {
        "total_placements": 5,
        "per_device": {"d0": 2, "d1": 2, "d2": 1},
    }
    s.reset_stats()
    assert s.get_placement_stats()["total_placements"] == 0 and s.select_device(DEVS) == "d0"


def test_lowest_kv_reads_the_pools():
    c, pools = make_fleet()
    cache(pools[0], [1, 2], keep=True)
    cache(pools[1], [3], keep=True)
    s = LoadAwareScheduler(c, "lowest_kv")  # auto_refresh: get_stats() before choosing
    assert s.select_device(DEVS) == "d2"
    cache(pools[2], [4, 5, 6], keep=True)
    assert s.select_device(DEVS) == "d1"


def test_lowest_kv_ties_go_to_fewest_placements_then_first():
    c, _ = make_fleet()
    s = LoadAwareScheduler(c, "lowest_kv")
    assert [s.select_device(DEVS) for _ in range(4)] == ["d0", "d1", "d2", "d0"]


def test_shortest_queue():
    c, _ = make_fleet()
    c.update_request_count("d0", 2, 1)
    c.update_request_count("d1", 1, 0)
    c.update_request_count("d2", 0, 3)
    s = LoadAwareScheduler(c, PlacementStrategy.SHORTEST_QUEUE)
    assert s.select_device(DEVS) == "d1"


def test_best_fit_needs_room_then_falls_back():
    c, pools = make_fleet(3, num_blocks=4)
    cache(pools[0], [1, 2, 3], keep=True)  # 4 free tokens
    cache(pools[1], [4], keep=True)  # 12 free tokens
    cache(pools[2], [5, 6], keep=True)  # 8 free tokens
    s = LoadAwareScheduler(c, "best_fit")
    assert s.select_device(DEVS, kv_tokens_required=10) == "d1"
    assert s.select_device(DEVS, kv_tokens_required=6) == "d1"  # fits d1, d2: lower util
    assert s.select_device(DEVS, kv_tokens_required=100) == "d1"  # none fits: lowest kv


def test_longest_prefix_peeks_without_touching():
    c, pools = make_fleet()
    cache(pools[1], [10, 11])
    cache(pools[2], [10, 11, 12, 13])
    before = [p.get_stats() for p in pools]
    s = LoadAwareScheduler(c, "longest_prefix")
    assert s.select_device(DEVS, block_hashes=[10, 11, 12, 99]) == "d2"
    assert s.last_matches == [0, 2, 3]
    assert [p.get_stats() for p in pools] == before  # a peek: no ref, no LRU touch, no count
    for p in pools:
        p.check_invariants()
    # no match anywhere: the least loaded, ties to fewest placements
    assert s.select_device(DEVS, block_hashes=[77]) == "d0"


def test_kv_cost_dynamo_rule_exact():
    c, pools = make_fleet()
    cache(pools[0], [1, 2, 3, 4])  # overlap 4, nothing in use
    cache(pools[1], [1, 2], keep=True)  # overlap 2, 2 blocks in use
    s = LoadAwareScheduler(c, "kv_cost", overlap_score_weight=1.0, temperature=0.0)
    req = [1, 2, 3, 4, 5, 6]
    # costs: d0 = 1*(6-4) + 0 = 2; d1 = 1*(6-2) + 2 = 6; d2 = 6 + 0 = 6
    assert s.select_device(DEVS, block_hashes=req) == "d0"
    # weight 0: decode blocks alone decide (d0 and d2 tie at 0; fewest placements: d2)
    s0 = LoadAwareScheduler(c, "kv_cost", overlap_score_weight=0.0)
    s0._placement_decisions["d0"] = 1
    assert s0.select_device(DEVS, block_hashes=req) == "d2"


def test_kv_cost_sampling_is_seeded():
    c, pools = make_fleet()
    cache(pools[0], [1, 2, 3, 4])
    picks = []
    for _ in range(2):
        s = LoadAwareScheduler(c, "kv_cost", temperature=1.0, seed=7)
        picks.append([s.select_device(DEVS, block_hashes=[1, 2, 3, 4]) for _ in range(30)])
    assert picks[0] == picks[1] and set(picks[0]) == set(DEVS)
    cold = LoadAwareScheduler(c, "kv_cost", temperature=0.01, seed=7)
    assert {cold.select_device(DEVS, block_hashes=[1, 2, 3, 4]) for _ in range(20)} == {"d0"}


def test_cache_aware_sglang_rules():
    c, pools = make_fleet()
    cache(pools[2], [1, 2, 3, 4])
    s = LoadAwareScheduler(c, "cache_aware")
    # balanced, match ratio 4/5 = 0.8 > 0.3: the longest match
    assert s.select_device(DEVS, block_hashes=[1, 2, 3, 4, 5]) == "d2"
    # balanced, ratio 1/5 = 0.2 <= 0.3: lowest KV load (the smallest tree)
    cache(pools[0], [9], keep=True)
    assert s.select_device(DEVS, block_hashes=[1, 8, 8, 8, 8]) == "d1"
    # imbalanced (max - min = 100 > 64 and 100 > 1.5 x 0): the shortest queue
    c.update_request_count("d2", 100, 0)
    c.update_request_count("d1", 10, 0)
    c.update_request_count("d0", 0, 0)
    assert s.select_device(DEVS, block_hashes=[1, 2, 3, 4, 5]) == "d0"
    # within the thresholds again: the cache wins despite the load
    c.update_request_count("d2", 50, 0)
    assert s.select_device(DEVS, block_hashes=[1, 2, 3, 4, 5]) == "d2"


def test_consistent_hash_session_and_prefix():
    c, _ = make_fleet()
    s = LoadAwareScheduler(c, "consistent_hash")
    a = [s.select_device(DEVS, session_id=f"s{j}") for j in range(40)]
    assert a == [s.select_device(DEVS, session_id=f"s{j}") for j in range(40)]
    assert set(a) == set(DEVS)
    # a removed device only moves its own keys
    b = [s.select_device(["d0", "d1"], session_id=f"s{j}") for j in range(40)]
    assert all(x == y for x, y in zip(a, b, strict=True) if x != "d2")
    p = LoadAwareScheduler(c, "consistent_hash", hash_key="prefix")
    assert p.select_device(DEVS, block_hashes=[5, 1]) == p.select_device(DEVS, block_hashes=[5, 2])
    # the same across processes: stable hashing, not Python's salted hash
    assert LoadAwareScheduler(c, "consistent_hash").select_device(DEVS, session_id="s0") == a[0]


def test_select_device_for_request_with_tokens_and_affinity():
    c, pools = make_fleet()
    toks = list(range(12))
    h, _ = pools[1].alloc_with_prefix(toks)
    pools[1].cache_blocks(h)
    pools[1].free(h)
    s = LoadAwareScheduler(c, "longest_prefix")
    req = SchedulerRequest(request_id="r1", num_tokens=12, prompt_tokens=toks)
    assert s.select_device_for_request(req) == "d1"
    assert s.select_device_for_request({"request_id": "r2", "device_affinity": "d2"}) == "d2"


@pytest.mark.parametrize(
    ("call", "err", "code"),
    [
        (lambda s: s.select_device([]), KVInvalidInputError, "KV_INVALID_INPUT"),
        (lambda s: s.select_device("d0"), KVInvalidTypeError, "KV_INVALID_TYPE"),
        (lambda s: s.select_device(["d0", "nope"]), KVInvalidInputError, "KV_INVALID_INPUT"),
        (lambda s: s.select_device(DEVS, -1), KVInvalidInputError, "KV_INVALID_INPUT"),
        (lambda s: s.select_device(DEVS, 1.5), KVInvalidTypeError, "KV_INVALID_TYPE"),
        (lambda s: s.select_device(DEVS, True), KVInvalidTypeError, "KV_INVALID_TYPE"),
        (
            lambda s: s.select_device(DEVS, block_hashes="abc"),
            KVInvalidTypeError,
            "KV_INVALID_TYPE",
        ),
    ],
)
def test_bad_input_typed_and_nothing_counted(call, err, code):
    c, pools = make_fleet()
    s = LoadAwareScheduler(c, "longest_prefix")
    s.select_device(DEVS)
    before = (s.get_placement_stats(), [p.get_stats() for p in pools])
    with pytest.raises(err) as ei:
        call(s)
    assert ei.value.code == code
    assert (s.get_placement_stats(), [p.get_stats() for p in pools]) == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"strategy": "nope"},
        {"temperature": -1},
        {"overlap_score_weight": float("nan")},
        {"cache_threshold": 2},
        {"hash_key": "user"},
        {"virtual_nodes": 0},
        {"seed": "x"},
    ],
)
def test_bad_config(kwargs):
    c, _ = make_fleet()
    with pytest.raises(KVConfigError) as ei:
        LoadAwareScheduler(c, **kwargs)
    assert ei.value.code == "KV_CONFIG_INVALID"


def test_collector_bad_input_unchanged():
    c, _ = make_fleet(1)
    m = c.get_metrics("d0")
    snap = m.to_dict()
    for bad, err in [
        (lambda: c.update_request_count("d0", 1, -1), KVInvalidInputError),
        (lambda: c.update_request_count("d0", 1.0, 0), KVInvalidTypeError),
        (lambda: c.update_kv_usage("zz", 1), KVInvalidInputError),
        (lambda: c.update_wait_time("d0", 1.0, float("inf")), KVInvalidInputError),
        (lambda: c.register_device(None), KVInvalidTypeError),
        (lambda: c.register_device(["x"]), KVInvalidTypeError),
        (lambda: c.attach_pool("d9", object()), KVInvalidTypeError),
        (lambda: LoadAwareScheduler(object()), KVInvalidTypeError),
    ]:
        with pytest.raises(err):
            bad()
        assert m.to_dict() == snap
    assert c.list_devices() == ["d0"]
