"""The mechanism: exact free-queue order, tail-first release, eviction, pins."""

from __future__ import annotations

import pytest

from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.entry_pool import EntryPool
from sagellm_kv_cache.errors import KVInvalidInputError, KVPoolFullError, KVRefCountUnderflowError


def run_request(bp: BlockPool, hashes: list, *, keep: bool = False) -> list[int]:
    """Lookup, take hits, allocate the rest, cache, release (unless keep)."""
    hit = bp.match_prefix(hashes)
    bp.touch(hit)
    ids = hit + bp.allocate(len(hashes) - len(hit))
    bp.cache_blocks(ids, hashes, len(hit))
    if not keep:
        bp.release(ids)
    return ids


def test_fresh_pool_allocates_in_id_order():
    bp = BlockPool(6)
    assert bp.allocate(2) == [0, 1]
    assert bp.allocate(3) == [2, 3, 4]
    assert list(bp.free_queue) == [5]


def test_uncached_blocks_return_to_back_of_free_queue_tail_first():
    bp = BlockPool(6)
    ids = bp.allocate(3)
    bp.release(ids)
    assert list(bp.free_queue) == [3, 4, 5, 2, 1, 0]


def test_tail_first_release_evicts_suffix_before_prefix():
    bp = BlockPool(4)
    ids = run_request(bp, ["a", "b", "c"])
    assert ids == [0, 1, 2]
    # evictable order (LRU first): c, b, a -- the request's tail goes first
    assert bp.policy.peek_victims(10) == [2, 1, 0]
    # one free block left (3); a 3-block request takes it, then evicts c (2) and b (1)
    assert bp.allocate(3) == [3, 2, 1]
    assert "a" in bp.cached and "b" not in bp.cached and "c" not in bp.cached
    assert bp.num_evictions == 2


def test_hit_blocks_leave_the_evictable_set_and_come_back_most_recent():
    bp = BlockPool(8)
    run_request(bp, ["a", "b"])  # blocks 0, 1
    run_request(bp, ["x", "y"])  # blocks 2, 3
    assert bp.policy.peek_victims(10) == [1, 0, 3, 2]
    ids = run_request(bp, ["a", "b", "c"], keep=True)
    assert ids == [0, 1, 4]
    assert bp.ref_counts[0] == bp.ref_counts[1] == 1
    assert bp.policy.peek_victims(10) == [3, 2]
    bp.release(ids)
    assert bp.policy.peek_victims(10) == [3, 2, 4, 1, 0]


def test_one_block_per_hash_duplicate_goes_back_free():
    bp = BlockPool(8)
    first = bp.allocate(1)
    second = bp.allocate(1)
    assert bp.cache_blocks(first, ["h"]) == 1
    assert bp.cache_blocks(second, ["h"]) == 0
    assert bp.cached == {"h": first[0]}
    bp.release(second)
    assert bp.free_queue[-1] == second[0]
    assert bp.block_hashes[second[0]] is None


def test_pool_full_raises_and_changes_nothing():
    bp = BlockPool(3)
    held = bp.allocate(2)
    before = (list(bp.free_queue), list(bp.ref_counts), dict(bp.cached))
    with pytest.raises(KVPoolFullError) as err:
        bp.allocate(2)
    assert err.value.code == "KV_POOL_FULL"
    assert (list(bp.free_queue), list(bp.ref_counts), dict(bp.cached)) == before
    assert held == [0, 1]


def test_pinned_cached_block_is_never_evicted():
    bp = BlockPool(3)
    run_request(bp, ["a", "b", "c"])
    bp.pin([0])
    assert bp.num_evictable == 2
    assert bp.allocate(2) == [2, 1]
    with pytest.raises(KVPoolFullError):
        bp.allocate(1)
    bp.unpin([0])
    assert bp.allocate(1) == [0]
    with pytest.raises(KVRefCountUnderflowError):
        bp.unpin([0])


def test_pinning_a_free_block_is_refused():
    bp = BlockPool(2)
    with pytest.raises(KVInvalidInputError):
        bp.pin([1])
    assert bp.pin_counts == [0, 0]


def test_explicit_evict_and_uncache():
    bp = BlockPool(4)
    run_request(bp, ["a", "b", "c"])
    assert bp.evict(2) == [2, 1]
    assert list(bp.free_queue) == [3, 2, 1]
    assert bp.uncache(0) is True
    assert bp.uncache(0) is False
    assert bp.cached == {} and bp.num_free == 4
    bp.check_invariants()


def test_release_underflow_is_reported():
    bp = BlockPool(2)
    with pytest.raises(KVRefCountUnderflowError):
        bp.release([0])


def test_reset_restores_initial_state():
    bp = BlockPool(4)
    run_request(bp, ["a", "b"], keep=True)
    bp.reset()
    assert list(bp.free_queue) == [0, 1, 2, 3] and bp.cached == {} and bp.ref_counts == [0] * 4
    bp.check_invariants()


def test_evictions_are_counted_by_reason():
    bp = BlockPool(4, block_size=2)
    ids = bp.allocate(3)
    bp.cache_blocks(ids, ["a", "b", "c"])
    bp.release(ids)
    bp.allocate(2)  # 1 free block + 1 capacity eviction
    assert bp.evictions_by_reason == {"capacity": 1}
    bp.evict(1)
    assert bp.uncache(ids[0], reason="invalidate")
    assert bp.evictions_by_reason == {"capacity": 1, "explicit": 1, "invalidate": 1}
    assert bp.num_evictions == 2  # invalidation is not an eviction
    bp.reset()
    assert bp.evictions_by_reason == {}


def test_a_block_after_a_duplicate_gets_the_hash_holder_as_parent():
    """Two requests computed the same first block; the second one's next block hangs
    under the block that holds the hash, not under its own unregistered duplicate."""
    bp = BlockPool(8, block_size=2, policy="leaf:lru")
    a = bp.allocate(1)  # block 0 holds "p"
    bp.cache_blocks(a, ["p"])
    bp.release(a)  # evictable (a leaf for now)
    b = bp.allocate(2)  # blocks 1, 2: 1 duplicates "p", 2 extends it
    bp.cache_blocks(b, ["p", "c"])
    assert bp.block_hashes[b[0]] is None  # one block per hash
    assert bp.parent_ids[b[1]] == a[0]
    # block 0 gained a cached child: no longer a victim while "c" is cached
    assert bp.policy.peek_victims(8) == []
    bp.release(b)
    assert bp.evict(8) == [b[1], a[0]]  # child first, then its parent
    bp.check_invariants()


def test_snapshot_names_the_hash_holder_as_parent():
    from sagellm_kv_cache.observability import KVEventStream

    bp = BlockPool(8, block_size=2)
    stream = KVEventStream(bp, block_size=2)
    a = bp.allocate(1)
    bp.cache_blocks(a, ["p"])
    b = bp.allocate(2)
    bp.cache_blocks(b, ["p", "c"])
    parents = {e.block_hashes[0]: e.parent_block_hash for e in stream.snapshot_events()[1:]}
    assert parents == {"p": None, "c": "p"}


def test_growable_pool_adds_blocks_before_evicting_and_shrinks_on_reset():
    bp = BlockPool(0, 4, growable=True, max_num_blocks=3)
    assert run_request(bp, ["a", "b"]) == [0, 1] and bp.num_blocks == 2
    # one block may still be added, the second is a victim: b's block (released first)
    assert run_request(bp, ["c", "d"]) == [2, 1] and bp.num_blocks == 3
    assert "b" not in bp.cached and bp.growth_room == 0
    with pytest.raises(KVPoolFullError):
        bp.allocate(4)
    bp.check_invariants()
    bp.reset()
    assert bp.num_blocks == 0 and not bp.free_queue and not bp.cached


def test_entry_pool_put_chain_keeps_its_chain_grows_then_evicts():
    ep = EntryPool(3, block_size=1)
    assert ep.put_chain(["a", "b"]) == ([0, 1], [0, 1])
    assert ep.put_chain(["a", "c"]) == ([0, 2], [1])
    assert ep.policy.peek_victims(3) == [1, 2, 0]  # b, c, then the refreshed a
    # full: the chain's a is kept out of the order, b is the victim and its block reused
    assert ep.put_chain(["a", "d"]) == ([0, 1], [1])
    assert ep.policy.peek_victims(3) == [2, 1, 0] and "b" not in ep.cached
    assert ep.hit_prefix(["c", "x", "a"]) == [2]  # stops at the first miss
    assert ep.policy.peek_victims(3) == [1, 0, 2]
    ep.check_invariants()
