"""Hardening of the pool API (issue 11, defects 3-8 and the pool half of 13).

* one test per defect, each failing on the code before the fix;
* a table of bad inputs over every public method of ``KVPool``, ``BlockPool``
  and ``PrefixCache``: each row asserts the error class, its ``code`` and
  that a structural snapshot of the pool is equal before and after;
* a ``RuleBasedStateMachine`` over a real-KV ``KVPool`` under every
  registered eviction policy (plain and ``leaf:``), checking after every step
  the block-state partition, ref and pin counts against live handles, the
  budget, and that every cached hash holds exactly the KV written under it.

Scale of the state machine: ``SAGELLM_STATEFUL_STEPS`` is the number of
steps per policy (default 1500: the CI profile runs all 18 policies in about
15 s of CPU); each test prints how many steps it checked (``-s``). The
long profile, at least 100k steps per policy (1-2 minutes per policy; ``--timeout=0``
lifts the suite's per-test limit, which a loaded machine can reach)::

    SAGELLM_STATEFUL_STEPS=100000 python -m pytest -q -s -p no:cacheprovider \\
        --timeout=0 tests/test_hardening_pool.py -k machine
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TINY
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sagellm_kv_cache import errors as E
from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.eviction.registry import POLICIES
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.prefix_cache import PrefixCache
from tests._machines import run_policy_machine

BS = 4


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def kv_for(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TINY.num_layers, 2, n, TINY.num_kv_heads, TINY.head_dim, generator=g).half()


def snapshot(pool: KVPool, *caches: PrefixCache) -> tuple:
    """Everything observable about a pool's state (stats, handles, blocks, hash map, KV)."""
    bp = pool.block_pool
    pool.check_invariants()
    handles = sorted(
        (h.handle_id, list(h.block_ids), h.num_tokens, h.pin_count, h.state, list(h.block_hashes))
        for h in pool.handles
    )
    kv = pool.storage.kv.clone() if pool.storage is not None else None
    return (
        pool.get_stats(),
        handles,
        list(bp.ref_counts),
        list(bp.pin_counts),
        list(bp.block_hashes),
        list(bp.free_queue),
        dict(bp.cached),
        bp.policy.peek_victims(bp.num_blocks),
        len(bp.policy),
        kv,
        [c.get_stats() for c in caches],
    )


def assert_same(a: tuple, b: tuple) -> None:
    *ra, kva, ca = a
    *rb, kvb, cb = b
    assert ra == rb and ca == cb
    assert (kva is None and kvb is None) or torch.equal(kva, kvb)


def cached_request(pool: KVPool, tokens: list[int], seed: int = 0):
    h, hit = pool.alloc_with_prefix(tokens)
    if hit < len(tokens):
        pool.write_kv(h, kv_for(len(tokens) - hit, seed), start_token=hit)
    pool.cache_blocks(h)
    return h, hit


# -- defect 3: cached blocks are immutable --------------------------------------------
def test_write_into_a_hit_range_is_refused_and_writes_nothing():
    pool = KVPool(num_blocks=8, block_size=BS, model_shape=TINY)
    t = list(range(8))
    a, _ = pool.alloc_with_prefix(t)
    ones = torch.ones(2, 2, 8, 2, 4, dtype=torch.float16)
    pool.write_kv(a, ones)
    pool.cache_blocks(a)
    b, hit = pool.alloc_with_prefix(t + [9, 9])
    assert hit == 8 and b.block_ids[:2] == a.block_ids
    before = snapshot(pool)
    for start, n in ((0, 10), (0, 8), (4, 2), (7, 3)):
        with pytest.raises(E.KVBlockImmutableError) as err:
            pool.write_kv(b, torch.zeros(2, 2, n, 2, 4, dtype=torch.float16), start_token=start)
        assert err.value.code == "KV_BLOCK_IMMUTABLE"
        assert set(err.value.details["block_ids"]) <= set(a.block_ids)
        assert_same(snapshot(pool), before)
    assert torch.equal(pool.read_kv(a), ones)
    # the handle's own uncached tail is writable; its cached blocks are not, once cached
    pool.write_kv(b, torch.full((2, 2, 2, 2, 4), 3.0, dtype=torch.float16), start_token=8)
    with pytest.raises(E.KVBlockImmutableError):
        pool.write_kv(a, ones[:, :, :4])  # a's own blocks, cached by a itself
    assert torch.equal(pool.read_kv(b, num_tokens=8), ones)


def test_copy_blocks_checks_ids_and_destinations_before_copying():
    pool = KVPool(num_blocks=8, block_size=BS, model_shape=TINY)
    cached_request(pool, list(range(8)), seed=1)  # blocks 0, 1 cached, held
    held = pool.alloc(4)  # block 2, held, not cached
    before = snapshot(pool)
    cases = [
        ([0], [1.5], E.KVInvalidTypeError),
        ([0], [True], E.KVInvalidTypeError),
        ([True], [5], E.KVInvalidTypeError),
        ([0], ["5"], E.KVInvalidTypeError),
        ([0], 5, E.KVInvalidTypeError),
        ([0], [8], E.KVInvalidInputError),
        ([0], [-1], E.KVInvalidInputError),
        ([0, 1], [5], E.KVInvalidInputError),
        ([0, 1], [5, 5], E.KVInvalidInputError),
        ([0], [1], E.KVBlockImmutableError),  # cached (and held)
        ([0], held.block_ids, E.KVBlockImmutableError),  # in use
        ([0, 0], [5, 1], E.KVBlockImmutableError),  # one bad destination: nothing copied
    ]
    for src, dst, err in cases:
        with pytest.raises(err) as info:
            pool.copy_blocks(src, dst)
        assert info.value.code == err.code, (src, dst)
        assert_same(snapshot(pool), before)
    pool.copy_blocks([np.int64(0), 1], [5, np.int32(6)])  # numpy ints are ints
    st_ = pool.storage
    assert torch.equal(st_.read_blocks([5, 6]), st_.read_blocks([0, 1]))


# -- defect 4: a failed alloc_with_prefix leaves everything as it was ------------------
@pytest.mark.parametrize("policy", ["ttl", "leaf:ttl"])
def test_failed_alloc_with_prefix_leaks_no_reference_under_ttl(policy):
    clock = Clock()
    pool = KVPool(num_blocks=4, block_size=BS, eviction_policy=policy, clock=clock)
    a8, b8, c8 = [1] * 8, [2] * 8, [3] * 8
    for p in (a8, b8):
        h, _ = pool.alloc_with_prefix(p)
        pool.cache_blocks(h)
        pool.pin_prefix(h, 1000.0)
        pool.free(h)
    before = snapshot(pool)
    for _ in range(4):  # repeated failures do not shrink the usable budget
        with pytest.raises(E.KVNoVictimError) as err:
            pool.alloc_with_prefix(a8 + c8)
        assert err.value.code == "KV_NO_VICTIM"
        assert_same(snapshot(pool), before)
    clock.t = 2000.0  # protection over: the same request fits
    h, hit = pool.alloc_with_prefix(a8 + c8)
    assert hit == 8
    pool.check_invariants()


@pytest.mark.parametrize("policy", [f"leaf:{p}" for p in sorted(POLICIES)])
def test_failed_alloc_with_prefix_leaks_no_reference_under_leaf(policy):
    pool = KVPool(num_blocks=5, block_size=BS, eviction_policy=policy)
    p, _ = pool.alloc_with_prefix([1] * 4)  # block 0 = hash A
    pool.cache_blocks(p)
    pool.free(p)
    held = pool.alloc(8)  # blocks 1, 2: block 2 cached as A's child, held
    pool.cache_blocks(held, tokens=[1] * 4 + [2] * 4)
    q, _ = pool.alloc_with_prefix([9] * 4)  # block 3
    pool.cache_blocks(q)
    pool.free(q)
    assert pool.block_pool.policy.num_blocked == 1  # block 0: its child is in use
    before = snapshot(pool)
    # hit block 3, 2 new: block 4 is free, block 0 is evictable but no leaf
    for _ in range(4):
        with pytest.raises(E.KVNoVictimError):
            pool.alloc_with_prefix([9] * 4 + [5] * 8)
        assert_same(snapshot(pool), before)
    pool.free(held)
    h, hit = pool.alloc_with_prefix([9] * 4 + [5] * 8)
    assert hit == 4 and h.block_ids[0] == 3
    pool.check_invariants()


def test_leaf_hit_blocks_are_not_counted_as_victims_they_would_uncover():
    pool = KVPool(num_blocks=3, block_size=BS, eviction_policy="leaf:lru")
    h, _ = pool.alloc_with_prefix([1] * 8)  # blocks 0 <- 1
    pool.cache_blocks(h)
    pool.free(h)
    # 1 hit (block 0) + 2 new: block 1 (leaf) can go, block 0 is the hit, 1 free block
    h2, hit = pool.alloc_with_prefix([1] * 4 + [5] * 8)
    assert hit == 4 and h2.block_ids[0] == 0 and sorted(h2.block_ids[1:]) == [1, 2]
    pool.check_invariants()


# -- defect 5: leaf:ttl never loses a victim -------------------------------------------
def test_leaf_ttl_pop_victims_is_all_or_nothing_with_protected_blocks():
    clock = Clock()
    bp = BlockPool(6, block_size=BS, policy="leaf:ttl", clock=clock)
    for chain in (["a", "ab"], ["c", "cd"], ["e"]):
        ids = bp.allocate(len(chain))
        bp.cache_blocks(ids, chain)
        bp.release(ids)
    bp.policy.inner.pin_for([bp.cached["cd"], bp.cached["e"]], 100.0)  # protected leaves
    assert len(bp.policy) == 5
    assert bp.policy.num_victims(5) == 2  # ab, then a; c is blocked by the protected cd
    before = (list(bp.free_queue), dict(bp.cached), bp.policy.peek_victims(9))
    with pytest.raises(E.KVNoVictimError):
        bp.policy.pop_victims(3)
    with pytest.raises(E.KVNoVictimError):
        bp.allocate(4)  # 1 free + 3 victims; 2 can go now
    assert (list(bp.free_queue), dict(bp.cached), bp.policy.peek_victims(9)) == before
    bp.check_invariants()
    assert bp.evict(5) == [1, 0]  # ab, then the a it uncovers: what can go now
    assert sorted(bp.cached) == ["c", "cd", "e"]
    bp.check_invariants()
    clock.t = 200.0
    assert len(bp.evict(5)) == 3
    bp.check_invariants()


def test_leaf_ttl_pool_keeps_matching_only_cached_blocks():
    clock = Clock()
    pool = KVPool(num_blocks=4, block_size=BS, eviction_policy="leaf:ttl", clock=clock)
    sys_prompt, _ = pool.alloc_with_prefix([7] * 8)
    pool.cache_blocks(sys_prompt)
    pool.pin_prefix(sys_prompt, 50.0)
    pool.free(sys_prompt)
    other, _ = pool.alloc_with_prefix([8] * 8)
    pool.cache_blocks(other)
    pool.free(other)
    with pytest.raises(E.KVNoVictimError):
        pool.alloc(12)  # 3 blocks: 2 unprotected victims only
    pool.check_invariants()
    for tokens in ([7] * 8, [8] * 8):
        ids, n = pool.match_prefix(tokens)
        assert n == len(ids) * BS
        assert all(pool.block_pool.block_hashes[b] is not None for b in ids)
    _, hit = pool.alloc_with_prefix([7] * 8 + [1] * 4)
    assert hit == 8
    pool.check_invariants()


# -- defect 6: None is not a block hash --------------------------------------------------
def test_none_block_hash_is_refused_everywhere():
    pool = KVPool(num_blocks=4, block_size=BS)
    h = pool.alloc(8)
    cache = PrefixCache(pool=pool)
    before = snapshot(pool, cache)
    calls = [
        lambda: pool.cache_blocks(h, block_hashes=[None]),
        lambda: pool.cache_blocks(h, block_hashes=[b"a", None]),
        lambda: cache.insert([None], [h.block_ids[0]]),
        lambda: pool.block_pool.cache_blocks(h.block_ids, [None]),
        lambda: pool.alloc_with_prefix(block_hashes=[None], num_tokens=4),
        lambda: pool.match_prefix(block_hashes=[None]),
        lambda: pool.invalidate([None]),
    ]
    for call in calls:
        with pytest.raises(E.KVInvalidInputError) as err:
            call()
        assert err.value.code == "KV_INVALID_INPUT"
        assert_same(snapshot(pool, cache), before)
    assert None not in pool.block_pool.cached
    pool.free(h)
    assert pool.get_stats()["free_blocks"] == 4


# -- defect 7: bad metadata allocates nothing ----------------------------------------------
def test_bad_metadata_allocates_nothing():
    pool = KVPool(num_blocks=4, block_size=BS)
    before = snapshot(pool)
    for _ in range(5):
        for call in (
            lambda: pool.alloc(4, metadata=5),
            lambda: pool.alloc_with_prefix([1, 2, 3, 4], metadata=5),
            lambda: pool.alloc_with_prefix([1, 2, 3, 4], metadata=["a"]),
            lambda: pool.alloc_with_prefix([1, 2, 3, 4], request_id=["r"]),
        ):
            with pytest.raises(E.KVInvalidTypeError):
                call()
            assert_same(snapshot(pool), before)
    assert pool.alloc(16, metadata={"r": 1}).metadata == {"r": 1}


# -- defect 8: a batch is checked whole before anything changes ----------------------------
def test_cache_blocks_and_invalidate_validate_the_whole_batch_first():
    pool = KVPool(num_blocks=4, block_size=BS)
    h = pool.alloc(8)
    before = snapshot(pool)
    with pytest.raises(E.KVInvalidTypeError):
        pool.cache_blocks(h, block_hashes=[b"a", ["x"]])
    assert_same(snapshot(pool), before)
    assert b"a" not in pool.block_pool.cached
    pool.cache_blocks(h, block_hashes=[b"a", b"b"])
    before = snapshot(pool)
    with pytest.raises(E.KVInvalidTypeError):
        pool.invalidate([b"a", ["x"]])
    assert_same(snapshot(pool), before)
    assert pool.invalidate([b"a"]) == 1


# -- 13: bad inputs over every public method, state unchanged ----------------------------
def make_env():
    clock = Clock()
    pool = KVPool(num_blocks=8, block_size=BS, model_shape=TINY, clock=clock)
    a, _ = cached_request(pool, list(range(8)), seed=1)  # blocks 0, 1: cached, held
    c, _ = cached_request(pool, [9] * 8, seed=2)
    pool.free(c)  # cached, evictable
    b = pool.alloc(6)  # held, not cached
    freed = pool.alloc(4)
    pool.free(freed)
    pc = PrefixCache(pool=pool)
    spc = PrefixCache(block_size=BS, max_cached_blocks=4)
    spc.insert(spc.compute_block_hashes([1] * 8), ["x", "y"], handle_id="h")
    return {
        "pool": pool,
        "bp": pool.block_pool,
        "a": a,
        "b": b,
        "freed": freed,
        "pc": pc,
        "spc": spc,
    }


KV4 = kv_for(4, 0)
T, INP, C, H, D, P, M = (
    E.KVInvalidTypeError,
    E.KVInvalidInputError,
    E.KVConfigError,
    E.KVInvalidHandleError,
    E.KVDoubleFreeError,
    E.KVHandlePinnedError,
    E.KVBlockImmutableError,
)
ROWS = [
    # KVPool.alloc(num_tokens, device, dtype, layout, metadata)
    ("alloc float", lambda e: e["pool"].alloc(4.0), T),
    ("alloc str", lambda e: e["pool"].alloc("4"), T),
    ("alloc bool", lambda e: e["pool"].alloc(True), T),
    ("alloc 0", lambda e: e["pool"].alloc(0), INP),
    ("alloc -4", lambda e: e["pool"].alloc(-4), INP),
    ("alloc huge", lambda e: e["pool"].alloc(2**40), E.KVBudgetExceededError),
    ("alloc device", lambda e: e["pool"].alloc(4, device="tpu"), C),
    ("alloc dtype", lambda e: e["pool"].alloc(4, dtype="int3"), C),
    ("alloc layout", lambda e: e["pool"].alloc(4, layout="XYZ"), C),
    ("alloc other dtype", lambda e: e["pool"].alloc(4, dtype="float32"), C),
    ("alloc metadata", lambda e: e["pool"].alloc(4, metadata=5), T),
    # KVPool.alloc_with_prefix(tokens, block_hashes, num_tokens, extra_keys, metadata, request_id)
    ("awp nothing", lambda e: e["pool"].alloc_with_prefix(), INP),
    ("awp empty", lambda e: e["pool"].alloc_with_prefix([]), INP),
    ("awp generator", lambda e: e["pool"].alloc_with_prefix(x for x in range(4)), T),
    ("awp set", lambda e: e["pool"].alloc_with_prefix({1, 2, 3, 4}), T),
    ("awp str", lambda e: e["pool"].alloc_with_prefix("abcd"), T),
    ("awp bools", lambda e: e["pool"].alloc_with_prefix([True] * 4), T),
    ("awp floats", lambda e: e["pool"].alloc_with_prefix([1.0] * 4), T),
    ("awp negative", lambda e: e["pool"].alloc_with_prefix([-1] * 4), INP),
    ("awp 2**64", lambda e: e["pool"].alloc_with_prefix([2**64] * 4), INP),
    ("awp numpy bool", lambda e: e["pool"].alloc_with_prefix(np.ones(4, dtype=bool)), T),
    ("awp numpy neg", lambda e: e["pool"].alloc_with_prefix(np.full(4, -2)), INP),
    ("awp numpy 2d", lambda e: e["pool"].alloc_with_prefix(np.ones((2, 2), dtype=int)), T),
    (
        "awp meta",
        lambda e: e["pool"].alloc_with_prefix(torch.ones(4, dtype=torch.long, device="meta")),
        INP,
    ),
    ("awp both", lambda e: e["pool"].alloc_with_prefix([1] * 4, block_hashes=[1]), INP),
    ("awp num_tokens str", lambda e: e["pool"].alloc_with_prefix([1] * 4, num_tokens="4"), T),
    ("awp num_tokens mismatch", lambda e: e["pool"].alloc_with_prefix([1] * 4, num_tokens=5), INP),
    ("awp hashes no n", lambda e: e["pool"].alloc_with_prefix(block_hashes=[1]), INP),
    (
        "awp hashes unhashable",
        lambda e: e["pool"].alloc_with_prefix(block_hashes=[[1]], num_tokens=4),
        T,
    ),
    (
        "awp hashes None",
        lambda e: e["pool"].alloc_with_prefix(block_hashes=[None], num_tokens=4),
        INP,
    ),
    ("awp hashes str", lambda e: e["pool"].alloc_with_prefix(block_hashes="ab", num_tokens=8), T),
    (
        "awp hashes count",
        lambda e: e["pool"].alloc_with_prefix(block_hashes=[1, 2, 3], num_tokens=8),
        INP,
    ),
    ("awp n float", lambda e: e["pool"].alloc_with_prefix(block_hashes=[1], num_tokens=4.0), T),
    ("awp n bool", lambda e: e["pool"].alloc_with_prefix(block_hashes=[], num_tokens=True), T),
    ("awp extra_keys", lambda e: e["pool"].alloc_with_prefix([1] * 4, extra_keys=object()), T),
    ("awp metadata", lambda e: e["pool"].alloc_with_prefix([1] * 4, metadata=5), T),
    ("awp request_id", lambda e: e["pool"].alloc_with_prefix([1] * 4, request_id=[1]), T),
    ("awp too long", lambda e: e["pool"].alloc_with_prefix([1] * 40), E.KVBudgetExceededError),
    # KVPool.cache_blocks(handle, tokens, block_hashes, num_tokens)
    ("cache not handle", lambda e: e["pool"].cache_blocks("h"), T),
    ("cache freed", lambda e: e["pool"].cache_blocks(e["freed"]), D),
    ("cache both", lambda e: e["pool"].cache_blocks(e["b"], tokens=[1] * 4, block_hashes=[1]), INP),
    ("cache None", lambda e: e["pool"].cache_blocks(e["b"], block_hashes=[None]), INP),
    ("cache unhashable", lambda e: e["pool"].cache_blocks(e["b"], block_hashes=[b"a", ["x"]]), T),
    ("cache hashes int", lambda e: e["pool"].cache_blocks(e["b"], block_hashes=5), T),
    ("cache too many", lambda e: e["pool"].cache_blocks(e["b"], block_hashes=[1, 2]), INP),
    ("cache bad tokens", lambda e: e["pool"].cache_blocks(e["b"], tokens=[True] * 4), T),
    ("cache n -4", lambda e: e["pool"].cache_blocks(e["a"], num_tokens=-4), INP),
    ("cache n float", lambda e: e["pool"].cache_blocks(e["a"], num_tokens=4.0), T),
    ("cache n bool", lambda e: e["pool"].cache_blocks(e["a"], num_tokens=True), T),
    ("cache n beyond", lambda e: e["pool"].cache_blocks(e["a"], num_tokens=12), INP),
    # free / pin / unpin / get_handle
    ("free none", lambda e: e["pool"].free(None), T),
    ("free twice", lambda e: e["pool"].free(e["freed"]), D),
    ("free foreign", lambda e: KVPool(num_blocks=2, block_size=BS).free(e["a"]), H),
    ("pin str", lambda e: e["pool"].pin("a"), T),
    ("unpin unpinned", lambda e: e["pool"].unpin(e["a"]), E.KVRefCountUnderflowError),
    ("get_handle list", lambda e: e["pool"].get_handle(["x"]), T),
    ("get_handle unknown", lambda e: e["pool"].get_handle("nope"), H),
    # match_prefix / evict / invalidate / can_admit
    ("match nothing", lambda e: e["pool"].match_prefix(), INP),
    ("match both", lambda e: e["pool"].match_prefix([1] * 4, block_hashes=[1]), INP),
    ("match unhashable", lambda e: e["pool"].match_prefix(block_hashes=[["x"]]), T),
    ("match set tokens", lambda e: e["pool"].match_prefix({1, 2, 3, 4}), T),
    ("evict float", lambda e: e["pool"].evict(1.5), T),
    ("evict 0", lambda e: e["pool"].evict(0), INP),
    ("invalidate str", lambda e: e["pool"].invalidate("ab"), T),
    ("invalidate mixed", lambda e: e["pool"].invalidate([e["a"].block_hashes[0], ["x"]]), T),
    ("invalidate None", lambda e: e["pool"].invalidate([e["a"].block_hashes[0], None]), INP),
    ("can_admit str", lambda e: e["pool"].can_admit("4"), T),
    # write_kv / read_kv / copy_blocks
    ("write list", lambda e: e["pool"].write_kv(e["b"], [[1]]), T),
    (
        "write meta",
        lambda e: e["pool"].write_kv(
            e["b"], torch.zeros(2, 2, 4, 2, 4, dtype=torch.float16, device="meta")
        ),
        INP,
    ),
    ("write dtype", lambda e: e["pool"].write_kv(e["b"], KV4.float()), T),
    (
        "write shape",
        lambda e: e["pool"].write_kv(e["b"], torch.zeros(2, 2, 4, 3, 4, dtype=torch.float16)),
        INP,
    ),
    (
        "write 0 tokens",
        lambda e: e["pool"].write_kv(e["b"], torch.zeros(2, 2, 0, 2, 4, dtype=torch.float16)),
        INP,
    ),
    ("write start float", lambda e: e["pool"].write_kv(e["b"], KV4, 1.0), T),
    ("write start bool", lambda e: e["pool"].write_kv(e["b"], KV4, True), T),
    ("write start str", lambda e: e["pool"].write_kv(e["b"], KV4, "1"), T),
    ("write start -1", lambda e: e["pool"].write_kv(e["b"], KV4, -1), INP),
    ("write beyond", lambda e: e["pool"].write_kv(e["b"], KV4, 4), INP),
    ("write cached", lambda e: e["pool"].write_kv(e["a"], KV4, 0), M),
    ("write freed", lambda e: e["pool"].write_kv(e["freed"], KV4), D),
    ("read start str", lambda e: e["pool"].read_kv(e["a"], start_token="1"), T),
    ("read n float", lambda e: e["pool"].read_kv(e["a"], num_tokens=2.0), T),
    ("read n 0", lambda e: e["pool"].read_kv(e["a"], num_tokens=0), INP),
    ("read beyond", lambda e: e["pool"].read_kv(e["a"], num_tokens=9), INP),
    ("copy float", lambda e: e["pool"].copy_blocks([0], [1.5]), T),
    ("copy bool", lambda e: e["pool"].copy_blocks([0], [True]), T),
    ("copy range", lambda e: e["pool"].copy_blocks([0], [99]), INP),
    ("copy lengths", lambda e: e["pool"].copy_blocks([0, 1], [7]), INP),
    ("copy into cached", lambda e: e["pool"].copy_blocks([7], [0]), M),
    ("copy into held", lambda e: e["pool"].copy_blocks([0], e["b"].block_ids[:1]), M),
    # hooks / retention
    ("add_hook int", lambda e: e["pool"].add_hook(5), T),
    ("remove_hook unknown", lambda e: e["pool"].remove_hook(object()), INP),
    ("set_retention lru", lambda e: e["pool"].set_retention(e["a"], 50), C),
    ("pin_prefix lru", lambda e: e["pool"].pin_prefix(e["a"], 5.0), C),
    # BlockPool (the mechanism: ids and hashes checked, state checked before changes)
    ("bp allocate float", lambda e: e["bp"].allocate(1.5), T),
    ("bp allocate -1", lambda e: e["bp"].allocate(-1), INP),
    ("bp allocate too many", lambda e: e["bp"].allocate(99), E.KVPoolFullError),
    ("bp touch free", lambda e: e["bp"].touch([e["b"].block_ids[0] + 3]), INP),
    ("bp touch range", lambda e: e["bp"].touch([99]), INP),
    ("bp touch negative", lambda e: e["bp"].touch([-1]), INP),
    ("bp touch bool", lambda e: e["bp"].touch([True]), T),
    ("bp touch set", lambda e: e["bp"].touch({0}), T),
    (
        "bp release free",
        lambda e: e["bp"].release([e["a"].block_ids[0], 7]),
        E.KVRefCountUnderflowError,
    ),
    (
        "bp release twice",
        lambda e: e["bp"].release([e["b"].block_ids[0]] * 2),
        E.KVRefCountUnderflowError,
    ),
    ("bp release float", lambda e: e["bp"].release([0.0]), T),
    ("bp cache None", lambda e: e["bp"].cache_blocks(e["b"].block_ids, [None]), INP),
    ("bp cache mixed", lambda e: e["bp"].cache_blocks(e["b"].block_ids, [b"q", ["x"]]), T),
    ("bp cache free block", lambda e: e["bp"].cache_blocks([7], [b"q"]), INP),
    (
        "bp cache more hashes",
        lambda e: e["bp"].cache_blocks([e["b"].block_ids[0]], [b"q", b"r"]),
        INP,
    ),
    ("bp cache start", lambda e: e["bp"].cache_blocks(e["b"].block_ids, [b"q"], start=9), INP),
    (
        "bp cache start float",
        lambda e: e["bp"].cache_blocks(e["b"].block_ids, [b"q"], start=0.0),
        T,
    ),
    ("bp uncache range", lambda e: e["bp"].uncache(99), INP),
    ("bp uncache str", lambda e: e["bp"].uncache("0"), T),
    ("bp pin free", lambda e: e["bp"].pin([7]), INP),
    ("bp pin range", lambda e: e["bp"].pin([99]), INP),
    ("bp unpin unpinned", lambda e: e["bp"].unpin([0]), E.KVRefCountUnderflowError),
    ("bp evict str", lambda e: e["bp"].evict("1"), T),
    ("bp evict -1", lambda e: e["bp"].evict(-1), INP),
    ("bp match unhashable", lambda e: e["bp"].match_prefix([["x"]]), T),
    ("bp evictable_among range", lambda e: e["bp"].num_evictable_among([99]), INP),
    # PrefixCache, pool-bound and standalone
    ("pc lookup str", lambda e: e["pc"].lookup("abc"), T),
    ("pc lookup unhashable", lambda e: e["pc"].lookup([["x"]]), T),
    ("pc lookup None", lambda e: e["pc"].lookup([None]), INP),
    ("pc lookup n float", lambda e: e["pc"].lookup([b"x"], num_tokens=4.0), T),
    ("pc lookup n -1", lambda e: e["pc"].lookup([b"x"], num_tokens=-1), INP),
    ("pc insert None", lambda e: e["pc"].insert([None], [e["b"].block_ids[0]]), INP),
    ("pc insert mixed", lambda e: e["pc"].insert([b"q", ["x"]], e["b"].block_ids[:2]), T),
    ("pc insert lengths", lambda e: e["pc"].insert([b"q"], e["b"].block_ids[:2]), INP),
    ("pc insert free block", lambda e: e["pc"].insert([b"q"], [7]), INP),
    ("pc insert bool id", lambda e: e["pc"].insert([b"q"], [True]), INP),
    ("pc insert blocks str", lambda e: e["pc"].insert([b"q"], "a"), T),
    ("pc insert dict no id", lambda e: e["pc"].insert([b"q"], [{"x": 1}]), INP),
    ("pc invalidate unknown", lambda e: e["pc"].invalidate("nope"), H),
    ("pc invalidate list", lambda e: e["pc"].invalidate(["x"]), T),
    ("pc evict float", lambda e: e["pc"].evict_by_count(1.5), T),
    ("pc evict -1", lambda e: e["pc"].evict_by_count(-1), INP),
    ("pc contains list", lambda e: ["x"] in e["pc"], T),
    ("pc hashes set", lambda e: e["pc"].compute_block_hashes({1, 2, 3, 4}), T),
    ("pc hash short", lambda e: e["pc"].compute_block_hash([1, 2]), INP),
    ("pc hash generator", lambda e: e["pc"].compute_block_hash(x for x in range(4)), T),
    ("pc hash parent str", lambda e: e["pc"].compute_block_hash([1] * 4, parent_hash="p"), T),
    ("spc insert handle list", lambda e: e["spc"].insert([b"q"], ["z"], handle_id=["h"]), T),
    ("spc insert None", lambda e: e["spc"].insert([b"q", None], ["z", "w"]), INP),
    (
        "spc insert too long",
        lambda e: e["spc"].insert([1, 2, 3, 4, 5], list("abcde")),
        E.KVPrefixTooLongError,
    ),
    ("spc invalidate list", lambda e: e["spc"].invalidate(["h"]), T),
    ("spc invalidate unknown", lambda e: e["spc"].invalidate("nope"), E.KVCacheMissError),
    ("spc lookup unhashable", lambda e: e["spc"].lookup([{}]), T),
    ("spc contains dict", lambda e: {} in e["spc"], T),
]


def spc_state(spc: PrefixCache) -> tuple:
    policy = spc.block_pool.policy
    return (spc.entries(), dict(spc.block_pool.cached), policy.peek_victims(99), spc.get_stats())


@pytest.mark.parametrize(("name", "call", "error"), ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_typed_and_changes_nothing(name, call, error):
    env = make_env()
    before = snapshot(env["pool"], env["pc"])
    spc_before = spc_state(env["spc"])
    with pytest.raises(error) as info:
        call(env)
    assert type(info.value) is error, f"{name}: {type(info.value).__name__}"
    assert info.value.code == error.code
    assert_same(snapshot(env["pool"], env["pc"]), before)
    assert spc_state(env["spc"]) == spc_before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_blocks": 2**40},
        {"max_tokens": 2**50},
        {"num_blocks": 2**33, "model_shape": TINY},
        {"num_blocks": 2**26, "model_shape": "llama-3-70b"},
    ],
)
def test_absurd_pool_sizes_are_config_errors_before_allocating(kwargs):
    with pytest.raises(E.KVConfigError) as info:
        KVPool(block_size=16, **kwargs)
    assert info.value.code == "KV_CONFIG_INVALID"
    with pytest.raises(E.KVConfigError):
        BlockPool(2**40)


# -- the state machine over every policy ----------------------------------------------
ALL_POLICIES = sorted(POLICIES) + [f"leaf:{p}" for p in sorted(POLICIES)]
STEPS = int(os.environ.get("SAGELLM_STATEFUL_STEPS", "1500"))
STEP_COUNTS: dict[str, int] = {}  # policy -> invariant checks run (one per step)
STEPS_PER_EXAMPLE = 50
NUM_BLOCKS = 8
ALPHABET = [[1] * BS, [2] * BS, [3] * BS]  # prompts are strings of 3 distinct blocks


class PoolMachine(RuleBasedStateMachine):
    policy = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.pool = KVPool(
            num_blocks=NUM_BLOCKS,
            block_size=BS,
            model_shape=TINY,
            eviction_policy=self.policy,
            clock=self.clock,
        )
        self.bp = self.pool.block_pool
        self.live: dict[str, tuple] = {}  # handle_id -> (handle, kv as written/hit)
        self.model: dict = {}  # block hash -> KV of its block, as written before caching
        self.seed = 0
        self.inner = self.policy.removeprefix("leaf:")

    def _pick(self, data):
        return self.live[data.draw(st.sampled_from(sorted(self.live)))]

    def _refused(self, call, errors) -> None:
        before = snapshot(self.pool)
        with pytest.raises(errors):
            call()
        assert_same(snapshot(self.pool), before)

    def _fresh_kv(self, n: int) -> torch.Tensor:
        self.seed += 1
        return kv_for(n, self.seed)

    @rule(n=st.integers(1, 3 * BS))
    def alloc(self, n):
        before = snapshot(self.pool)
        try:
            h = self.pool.alloc(n)
        except (E.KVBudgetExceededError, E.KVNoVictimError):
            assert_same(snapshot(self.pool), before)
            return
        kv = self._fresh_kv(n)
        self.pool.write_kv(h, kv)
        self.live[h.handle_id] = (h, kv)

    @rule(
        blocks=st.lists(st.integers(0, 2), min_size=0, max_size=4),
        tail=st.integers(0, BS - 1),
    )
    def alloc_with_prefix(self, blocks, tail):
        tokens = [t for i in blocks for t in ALPHABET[i]] + [7] * tail
        if not tokens:
            return
        before = snapshot(self.pool)
        try:
            h, hit = self.pool.alloc_with_prefix(tokens)
        except (E.KVBudgetExceededError, E.KVNoVictimError):
            assert_same(snapshot(self.pool), before)
            return
        parts = []
        for i in range(hit // BS):  # every hit holds what was written under its hash
            want = self.model[h.block_hashes[i]]
            assert torch.equal(self.pool.read_kv(h, BS, i * BS), want)
            parts.append(want)
        if hit < len(tokens):
            new = self._fresh_kv(len(tokens) - hit)
            self.pool.write_kv(h, new, start_token=hit)
            parts.append(new)
        if hit:  # the hit range is read-only
            self._refused(
                lambda: self.pool.write_kv(h, self._fresh_kv(BS), start_token=0),
                E.KVBlockImmutableError,
            )
        self.live[h.handle_id] = (h, torch.cat(parts, dim=2))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.sampled_from([None, 0, BS, 2 * BS]))
    def cache_blocks(self, data, chunk):
        h, kv = self._pick(data)
        if not h.block_hashes:  # from alloc: give it unique hashes
            self.seed += 1
            hashes = [("alloc", self.seed, i) for i in range(h.num_tokens // BS)]
            if chunk is not None and chunk > h.num_tokens:
                chunk = None
            self.pool.cache_blocks(h, block_hashes=hashes, num_tokens=chunk)
        else:
            if chunk is not None and chunk > h.num_tokens:
                chunk = None
            self.pool.cache_blocks(h, num_tokens=chunk)
        bp = self.bp
        for i, hh in enumerate(h.block_hashes):
            b = h.block_ids[i]
            if bp.block_hashes[b] == hh:
                self.model[hh] = kv[:, :, i * BS : (i + 1) * BS]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        h, _ = self._pick(data)
        if h.pin_count:
            self._refused(lambda: self.pool.free(h), E.KVHandlePinnedError)
            return
        self.pool.free(h)
        del self.live[h.handle_id]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def pin(self, data):
        h, _ = self._pick(data)
        self.pool.pin(h)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def unpin(self, data):
        h, _ = self._pick(data)
        if h.pin_count:
            self.pool.unpin(h)
        else:
            self._refused(lambda: self.pool.unpin(h), E.KVRefCountUnderflowError)

    @precondition(lambda self: self.live and self.inner in ("ttl", "priority"))
    @rule(data=st.data(), value=st.integers(1, 90))
    def retention(self, data, value):
        h, _ = self._pick(data)
        if all(self.bp.block_hashes[b] is None for b in h.block_ids):
            if self.inner == "ttl":
                self._refused(lambda: self.pool.pin_prefix(h, 5.0), E.KVInvalidInputError)
            else:
                self._refused(lambda: self.pool.set_retention(h, 50), E.KVInvalidInputError)
            return
        if self.inner == "ttl":
            self.pool.pin_prefix(h, float(value))
        else:
            self.pool.set_retention(h, value, duration_s=float(value) if value % 2 else None)

    @rule(dt=st.sampled_from([1.0, 10.0, 100.0]))
    def tick(self, dt):
        self.clock.t += dt

    @rule(n=st.integers(1, NUM_BLOCKS))
    def evict(self, n):
        evictable = self.bp.num_evictable
        out = self.pool.evict(n)
        assert len(out) <= min(n, evictable)
        assert len(set(out)) == len(out) and set(out) <= set(self.bp.free_queue)

    @precondition(lambda self: self.bp.cached)
    @rule(data=st.data())
    def invalidate(self, data):
        hashes = sorted(self.bp.cached, key=repr)
        k = data.draw(st.integers(1, len(hashes)))
        assert self.pool.invalidate(hashes[:k]) == k

    @rule(data=st.data())
    def bad_input(self, data):
        live = sorted(self.live)
        h = self.live[live[0]][0] if live else None
        calls = [
            (lambda: self.pool.alloc(4, metadata=5), E.KVInvalidTypeError),
            (lambda: self.pool.alloc_with_prefix([1] * 4, metadata=5), E.KVInvalidTypeError),
            (lambda: self.pool.alloc_with_prefix([True] * 4), E.KVInvalidTypeError),
            (lambda: self.pool.alloc_with_prefix({1, 2, 3, 4}), E.KVInvalidTypeError),
            (lambda: self.pool.alloc_with_prefix([-1] * 4), E.KVInvalidInputError),
            (lambda: self.pool.invalidate([b"x", ["y"]]), E.KVInvalidTypeError),
            (lambda: self.pool.copy_blocks([0], [True]), E.KVInvalidTypeError),
            (lambda: self.pool.evict(0), E.KVInvalidInputError),
        ]
        if h is not None:
            calls += [
                (lambda: self.pool.cache_blocks(h, block_hashes=[None]), E.KVInvalidInputError),
                (lambda: self.pool.cache_blocks(h, num_tokens=-4), E.KVInvalidInputError),
                (lambda: self.pool.write_kv(h, KV4, start_token=1.0), E.KVInvalidTypeError),
            ]
        call, err = data.draw(st.sampled_from(calls))
        self._refused(call, err)

    @invariant()
    def consistent(self):
        STEP_COUNTS[self.policy] = STEP_COUNTS.get(self.policy, 0) + 1
        pool, bp = self.pool, self.bp
        pool.check_invariants()  # partition, hash map, refs == live handles' references
        pins = [0] * NUM_BLOCKS
        for h, _ in self.live.values():
            for b in h.block_ids:
                pins[b] += h.pin_count
        assert pins == bp.pin_counts
        assert (
            bp.num_used <= NUM_BLOCKS and bp.num_free + bp.num_evictable + bp.num_used == NUM_BLOCKS
        )
        storage = pool.storage
        for hh, b in bp.cached.items():  # every cached hash holds the KV written under it
            got = storage._to_tokens(storage.read_blocks([b]))
            assert torch.equal(got.view(torch.float16), self.model[hh]), (hh, b)
        for h, kv in self.live.values():
            assert torch.equal(pool.read_kv(h), kv)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_pool_machine(policy):
    run_policy_machine(
        PoolMachine,
        policy,
        prefix="Machine",
        steps=STEPS,
        steps_per_example=STEPS_PER_EXAMPLE,
        slack=(6, 5),  # hypothesis ends some runs early: 20% more runs reach STEPS steps
    )
    print(f"{policy}: {STEP_COUNTS.get(policy, 0)} steps checked")
