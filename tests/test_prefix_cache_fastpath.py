"""The standalone PrefixCache's LRU insert fast path behaves exactly like the general path."""

from __future__ import annotations

import random

import pytest

from sagellm_kv_cache import PrefixCache


def _order(cache: PrefixCache) -> list:
    return [cache._slot_hash[s] for s in cache._policy.peek_victims(10**6)]


@pytest.mark.parametrize("seed", range(40))
def test_fast_and_general_insert_agree_step_by_step(seed):
    rng = random.Random(seed)
    cap = rng.choice([None, 3, 5, 8, 16])
    fast = PrefixCache(block_size=2, max_cached_blocks=cap)
    slow = PrefixCache(block_size=2, max_cached_blocks=cap)
    assert fast._lru_fast
    slow._lru_fast = False  # forces the general path
    for step in range(80):
        # few distinct tokens: shared prefixes, repeats inside one request, misses
        tokens = [rng.randrange(3) for _ in range(rng.randrange(0, 14))]
        hashes = fast.compute_block_hashes(tokens)
        if cap is not None and len(hashes) > cap:
            continue
        op = rng.random()
        if op < 0.4:
            assert fast.lookup(hashes) == slow.lookup(hashes)
        elif op < 0.9:
            blocks = [{"block_id": f"{step}.{i}"} for i in range(len(hashes))]
            if rng.random() < 0.3:  # grouped for invalidate, in the dict or as an argument
                for blk in blocks:
                    blk["handle_id"] = f"h{step % 3}"
                assert fast.insert(hashes, blocks) == slow.insert(hashes, blocks)
            else:
                hid = f"h{step % 3}" if rng.random() < 0.3 else None
                assert fast.insert(hashes, blocks, hid) == slow.insert(hashes, blocks, hid)
        elif op < 0.95:
            hid = f"h{rng.randrange(3)}"
            try:
                n_fast = fast.invalidate(hid)
            except KeyError:
                n_fast = None
            try:
                n_slow = slow.invalidate(hid)
            except KeyError:
                n_slow = None
            assert n_fast == n_slow
        else:
            assert fast.evict_by_count(2) == slow.evict_by_count(2)
        assert _order(fast) == _order(slow), f"step {step}"
        assert fast.get_stats() == slow.get_stats()
        assert len(fast) == len(slow)


def test_exact_order_after_a_suffix_insert_that_evicts():
    cache = PrefixCache(block_size=1, max_cached_blocks=4)
    a = cache.compute_block_hashes([1, 2])  # a0, a1
    b = cache.compute_block_hashes([9])  # b0
    cache.insert(a, ["a0", "a1"])
    cache.insert(b, ["b0"])
    # order (LRU first): a1, a0, b0 -> inserting a + 2 new blocks needs 1 victim: b0,
    # because the prefix a0, a1 is protected while its suffix goes in
    ext = cache.compute_block_hashes([1, 2, 3, 4])
    assert cache.insert(ext, ["a0", "a1", "x2", "x3"]) == 2
    assert b[0] not in cache
    assert _order(cache) == [ext[3], ext[2], ext[1], ext[0]]
    assert cache.get_stats()["evictions"] == 1
