"""The standalone PrefixCache's one insert path (``BlockPool.put_chain``) against a small
reference model of an LRU prefix cache, step by step, through the public API only."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from sagellm_kv_cache import PrefixCache
from sagellm_kv_cache.errors import KVCacheMissError


def _order(cache: PrefixCache) -> list:
    """Cached hashes in eviction order (least recent first)."""
    bp = cache.block_pool
    return [bp.block_hashes[b] for b in bp.policy.peek_victims(len(bp.policy))]


class RefLRU:
    """What the standalone cache promises under LRU, stated directly: an ordered map
    hash -> (block, handle), least recent first; a lookup refreshes its hit run and an
    insert its whole chain, tail first (the chain's first block ends most recent); room
    is made from the least recent entries outside the chain."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.od: OrderedDict = OrderedDict()
        self.evictions = 0

    def lookup(self, hashes: list) -> list:
        run = []
        for h in hashes:
            if h not in self.od:
                break
            run.append(h)
        for h in reversed(run):
            self.od.move_to_end(h)
        return [self.od[h][0] for h in run]

    def insert(self, hashes: list, blocks: list, handle_id) -> int:
        chain = list(dict.fromkeys(hashes))
        new = [h for h in chain if h not in self.od]
        if self.capacity is not None:
            over = len(self.od) + len(new) - self.capacity
            victims = [h for h in self.od if h not in chain][: max(over, 0)]
            for h in victims:
                del self.od[h]
            self.evictions += len(victims)
        for i, h in enumerate(hashes):
            if h in new and h not in self.od:
                blk = blocks[i]
                hid = blk.get("handle_id", handle_id) if type(blk) is dict else handle_id
                self.od[h] = (blk, hid)
        for h in reversed(chain):
            self.od.move_to_end(h)
        return len(new)

    def invalidate(self, handle_id) -> int:
        mine = [h for h, (_, hid) in self.od.items() if hid == handle_id]
        if not mine:
            raise KVCacheMissError(handle_id)
        for h in mine:
            del self.od[h]
        return len(mine)

    def evict(self, n: int) -> int:
        victims = list(self.od)[:n]
        for h in victims:
            del self.od[h]
        self.evictions += len(victims)
        return len(victims)


@pytest.mark.parametrize("seed", range(40))
def test_standalone_cache_follows_the_lru_model_step_by_step(seed):
    rng = random.Random(seed)
    cap = rng.choice([None, 3, 5, 8, 16])
    cache = PrefixCache(block_size=2, max_cached_blocks=cap)
    ref = RefLRU(cap)
    for step in range(80):
        # few distinct tokens: shared prefixes, misses, chains longer than the cache
        tokens = [rng.randrange(3) for _ in range(rng.randrange(0, 14))]
        hashes = cache.compute_block_hashes(tokens)
        if cap is not None and len(hashes) > cap:
            continue
        op = rng.random()
        if op < 0.4:
            hit, n = cache.lookup(hashes)
            assert hit == ref.lookup(hashes) and n == 2 * len(hit)
        elif op < 0.9:
            blocks = [{"block_id": f"{step}.{i}"} for i in range(len(hashes))]
            hid = f"h{step % 3}" if rng.random() < 0.3 else None
            if rng.random() < 0.3:  # grouped in the dict instead
                for blk in blocks:
                    blk["handle_id"] = f"h{step % 3}"
            assert cache.insert(hashes, blocks, hid) == ref.insert(hashes, blocks, hid)
        elif op < 0.95:
            hid = f"h{rng.randrange(3)}"
            try:
                n_ref = ref.invalidate(hid)
            except KVCacheMissError:
                with pytest.raises(KVCacheMissError):
                    cache.invalidate(hid)
            else:
                assert cache.invalidate(hid) == n_ref
        else:
            assert cache.evict_by_count(2) == ref.evict(2)
        assert _order(cache) == list(ref.od), f"step {step}"
        assert cache.entries() == dict(ref.od)
        assert cache.get_stats()["evictions"] == ref.evictions
        cache.block_pool.check_invariants()


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


def test_repeated_hashes_in_one_insert_take_one_block_and_order_by_last_place():
    cache = PrefixCache(block_size=1, max_cached_blocks=8)
    assert cache.insert(["x", "y", "x"], ["bx", "by", "bx2"]) == 2
    assert cache.entries() == {"x": ("bx", None), "y": ("by", None)}
    # released tail first over the distinct blocks: x (its last place) first, then y
    assert _order(cache) == ["x", "y"]
    assert cache.insert(["y", "x", "y"], ["-", "-", "-"]) == 0
    assert _order(cache) == ["y", "x"]
