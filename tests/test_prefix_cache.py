"""PrefixCache: lookup semantics, LRU order, stats definitions, pool-bound agreement."""

from __future__ import annotations

import pytest
from conftest import make_pool, make_tokens

from sagellm_kv_cache import errors as E
from sagellm_kv_cache.prefix_cache import PrefixCache


def blocks_for(hashes, start=0):
    return [{"block_id": start + i} for i in range(len(hashes))]


def test_lookup_stops_at_first_miss():
    cache = PrefixCache(block_size=4)
    hashes = cache.compute_block_hashes(list(range(16)))
    cache.insert(hashes[:1] + hashes[2:], [{"block_id": 0}, {"block_id": 2}, {"block_id": 3}])
    hit, n = cache.lookup(hashes)
    assert hit == [{"block_id": 0}] and n == 4


def test_lru_capacity_evicts_least_recent_request_tail_first():
    cache = PrefixCache(block_size=4, max_cached_blocks=4)
    a = cache.compute_block_hashes([1] * 8)  # 2 blocks
    b = cache.compute_block_hashes([2] * 8)
    cache.insert(a, blocks_for(a, 0))
    cache.insert(b, blocks_for(b, 10))
    assert cache.get_stats()["evictions"] == 0  # under capacity: nothing counted
    cache.lookup(a)  # a becomes most recent
    c = cache.compute_block_hashes([3] * 4)
    cache.insert(c, blocks_for(c, 20))
    # b's tail (block 11) goes first, then b's head
    assert b[1] not in cache and b[0] in cache and a[0] in cache and a[1] in cache
    cache.insert(cache.compute_block_hashes([4] * 4), [{"block_id": 30}])
    assert b[0] not in cache
    assert cache.get_stats()["evictions"] == 2 and len(cache) == 4


def test_enable_lru_false_keeps_insertion_order():
    cache = PrefixCache(block_size=4, max_cached_blocks=2, enable_lru=False)
    a = cache.compute_block_hashes([1] * 4)
    b = cache.compute_block_hashes([2] * 4)
    cache.insert(a, blocks_for(a))
    cache.insert(b, blocks_for(b))
    cache.lookup(a)  # no recency refresh
    cache.insert(cache.compute_block_hashes([3] * 4), [{"block_id": 9}])
    assert a[0] not in cache and b[0] in cache


def test_insert_never_evicts_the_prefix_being_inserted():
    cache = PrefixCache(block_size=4, max_cached_blocks=3)
    old = cache.compute_block_hashes([1] * 12)
    cache.insert(old, blocks_for(old))
    new = cache.compute_block_hashes([1] * 4 + [2] * 8)  # shares the first block
    assert cache.insert(new, blocks_for(new, 10)) == 2
    assert all(h in cache for h in new)
    assert cache.lookup(new)[1] == 12


def test_stats_definitions():
    cache = PrefixCache(block_size=4)
    h = cache.compute_block_hashes(list(range(12)))
    cache.insert(h[:2], blocks_for(h[:2]))
    cache.lookup(h)  # 2 of 3 blocks
    cache.lookup(cache.compute_block_hashes([9] * 8))  # miss
    cache.lookup(h[:1], num_tokens=6)  # 1 of 1 block, prompt of 6 tokens
    s = cache.get_stats()
    assert (s["query_tokens"], s["hit_tokens"]) == (12 + 8 + 6, 8 + 4)
    assert s["hit_rate"] == s["token_hit_ratio"] == pytest.approx(12 / 26)
    assert s["block_hit_ratio"] == pytest.approx(3 / 6)
    assert s["request_hit_ratio"] == pytest.approx(2 / 3)
    assert s["evictions"] == 0 and s["insertions"] == 2


def test_invalidate_by_handle():
    cache = PrefixCache(block_size=4)
    a = cache.compute_block_hashes([1] * 8)
    b = cache.compute_block_hashes([2] * 8)
    cache.insert(a, blocks_for(a), handle_id="ha")
    cache.insert(b, [{"block_id": 5, "handle_id": "hb"}, {"block_id": 6, "handle_id": "hb"}])
    assert cache.invalidate("ha") == 2
    assert a[0] not in cache and b[0] in cache
    assert cache.invalidate("hb") == 2 and len(cache) == 0
    with pytest.raises(E.KVCacheMissError):
        cache.invalidate("ha")


def test_evict_by_count_and_clear():
    cache = PrefixCache(block_size=4)
    a = cache.compute_block_hashes([1] * 12)
    cache.insert(a, blocks_for(a))
    assert cache.evict_by_count(2) == 2
    assert a[0] in cache and a[2] not in cache
    cache.clear()
    assert len(cache) == 0 and cache.lookup(a)[1] == 0


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda c, h: c.insert(h, [{"block_id": 0}]), E.KVInvalidInputError),  # length mismatch
        (lambda c, h: c.insert(h * 5, [{}] * 15), E.KVPrefixTooLongError),  # > capacity
        (lambda c, h: c.insert("abc", [1, 2, 3]), E.KVInvalidTypeError),
        (lambda c, h: c.lookup(None), E.KVInvalidTypeError),
        (lambda c, h: c.compute_block_hashes([1, 2, "3", 4]), E.KVInvalidTypeError),
        (lambda c, h: c.compute_block_hash([1, 2]), E.KVInvalidInputError),
        (lambda c, h: c.evict_by_count(-1), E.KVInvalidInputError),
        (lambda c, h: c.evict_by_count(1.5), E.KVInvalidTypeError),
    ],
)
def test_bad_input_changes_nothing(call, error):
    cache = PrefixCache(block_size=4, max_cached_blocks=10)
    h = cache.compute_block_hashes(list(range(12)))
    cache.insert(h, blocks_for(h))
    before = (cache.get_stats(), dict(cache.block_pool.cached))
    with pytest.raises(error):
        call(cache, h)
    assert (cache.get_stats(), dict(cache.block_pool.cached)) == before


def test_bad_construction():
    with pytest.raises(E.KVInvalidInputError):
        PrefixCache(block_size=0)
    with pytest.raises(E.KVInvalidInputError):
        PrefixCache(max_cached_blocks=0)
    with pytest.raises(E.KVConfigError):
        PrefixCache(eviction_policy="nope")


def test_pool_bound_cache_agrees_with_pool_on_block_ids():
    pool = make_pool(num_blocks=8, block_size=4)
    cache = PrefixCache(pool=pool)
    tokens = make_tokens(12, seed=3)
    h = pool.alloc(12)
    hashes = cache.compute_block_hashes(tokens)
    assert hashes == pool.compute_block_hashes(tokens)
    assert cache.insert(hashes, h.block_ids) == 3
    hit, n = cache.lookup(hashes)
    assert hit == h.block_ids and n == 12
    pool.free(h)
    h2, hit_tokens = pool.alloc_with_prefix(tokens + [1])
    assert hit_tokens == 12 and h2.block_ids[:3] == h.block_ids
    # blocks not held by a live handle cannot be inserted
    with pytest.raises(E.KVInvalidInputError):
        cache.insert(["zz"], [7])
    assert cache.invalidate(h2.handle_id) == 3
    assert pool.match_prefix(tokens)[1] == 0
