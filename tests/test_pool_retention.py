"""Retention through the pool (priority / TTL policies) and constrained policies at the edges."""

from __future__ import annotations

import pytest

from sagellm_kv_cache import PrefixCache
from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.errors import (
    KVConfigError,
    KVInvalidInputError,
    KVNoVictimError,
    KVRefCountUnderflowError,
)
from sagellm_kv_cache.pool import KVPool


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _cached_request(pool: KVPool, tokens: list[int]):
    h, _ = pool.alloc_with_prefix(tokens)
    pool.cache_blocks(h)
    return h


def test_pin_prefix_keeps_a_system_prompt_until_its_ttl_ends():
    clock = Clock()
    pool = KVPool(num_blocks=4, block_size=2, eviction_policy="ttl", clock=clock)
    system = _cached_request(pool, [1, 2, 3, 4])  # blocks 0, 1
    pool.pin_prefix(system, ttl_s=10.0)
    pool.free(system)
    other = _cached_request(pool, [9, 9, 8, 8])  # blocks 2, 3
    pool.free(other)
    # 2 blocks needed: only the unprotected request's blocks can go
    h = _cached_request(pool, [5, 5, 6, 6])
    assert sorted(h.block_ids) == [2, 3]
    pool.free(h)
    # a third request would need the protected blocks: nothing changes
    before = pool.get_stats()
    with pytest.raises(KVNoVictimError):
        pool.alloc_with_prefix([7, 7, 7, 7, 7, 7, 7, 7])
    assert pool.get_stats() == before
    # explicit eviction takes what it can and leaves the protected prefix
    assert sorted(pool.evict(4)) == [2, 3]
    assert pool.match_prefix([1, 2, 3, 4])[1] == 4
    clock.t = 11.0  # protection over: back to plain LRU
    assert sorted(pool.evict(4)) == [0, 1]
    pool.check_invariants()


def test_set_retention_orders_victims_by_priority():
    pool = KVPool(num_blocks=4, block_size=2, eviction_policy="priority")
    keep = _cached_request(pool, [1, 1, 2, 2])
    pool.set_retention(keep, priority=90)
    pool.free(keep)
    drop = _cached_request(pool, [3, 3, 4, 4])
    pool.free(drop)  # released last: plain LRU would evict `keep` first
    assert sorted(pool.evict(2)) == sorted(drop.block_ids)


def test_retention_calls_need_the_right_policy_and_cached_blocks():
    pool = KVPool(num_blocks=4, block_size=2)  # lru
    h = _cached_request(pool, [1, 1, 2, 2])
    with pytest.raises(KVConfigError, match="set_retention"):
        pool.set_retention(h, 50)
    with pytest.raises(KVConfigError, match="pin_for"):
        pool.pin_prefix(h, 5.0)
    ttl = KVPool(num_blocks=4, block_size=2, eviction_policy="leaf:ttl")
    fresh = ttl.alloc(3)  # nothing cached yet
    with pytest.raises(KVInvalidInputError, match="no cached blocks"):
        ttl.pin_prefix(fresh, 5.0)
    h2 = _cached_request(ttl, [1, 1, 2, 2])
    ttl.pin_prefix(h2, 5.0)  # found through the leaf-only wrapper
    with pytest.raises(KVInvalidInputError):
        ttl.pin_prefix(h2, -1.0)


def test_unpin_with_a_repeated_id_cannot_drive_the_count_negative():
    bp = BlockPool(4, block_size=2)
    ids = bp.allocate(1)
    bp.pin(ids)
    with pytest.raises(KVRefCountUnderflowError, match="unpinned 2x"):
        bp.unpin([ids[0], ids[0]])
    assert bp.pin_counts[ids[0]] == 1
    bp.unpin(ids)
    bp.release(ids)
    bp.check_invariants()


def test_standalone_insert_that_cannot_evict_changes_nothing():
    cache = PrefixCache(block_size=2, max_cached_blocks=3, eviction_policy="ttl")
    first = cache.compute_block_hashes([1, 2, 3, 4])
    cache.insert(first, ["a", "b"])  # slots 0, 1
    cache.insert(cache.compute_block_hashes([8, 8]), ["c"])  # slot 2
    cache.block_pool.policy.pin_for([0, 1, 2], 100.0)  # every entry protected
    with pytest.raises(KVNoVictimError):
        cache.insert(cache.compute_block_hashes([7, 7]), ["d"])
    assert len(cache) == 3
    # re-touching the protected prefix plus one new block fails the same way
    with pytest.raises(KVNoVictimError):
        cache.insert(cache.compute_block_hashes([1, 2, 3, 4, 5, 6]), ["a", "b", "x"])
    assert len(cache.block_pool.policy) == 3  # the prefix went back into the order
    assert cache.lookup(first) == (["a", "b"], 4)
    assert cache.evict_by_count(5) == 0  # all protected: nothing to evict, no error
    cache.block_pool.policy.unprotect([0, 1, 2])
    assert cache.evict_by_count(5) == 3


def test_clear_drops_protected_entries_of_a_pool_bound_cache():
    pool = KVPool(num_blocks=4, block_size=2, eviction_policy="ttl")
    h = _cached_request(pool, [1, 1, 2, 2])
    pool.pin_prefix(h, 100.0)
    pool.free(h)
    cache = PrefixCache(pool=pool)
    cache.clear()
    assert len(cache) == 0
    pool.check_invariants()
