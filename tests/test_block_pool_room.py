"""``block_pool_room.room``: the room rule, against hand-checked pools and against
the mechanism it predicts (``touch(hits)`` then ``allocate(need)``).

The rule is the one ``KVPool``'s admission, ``BlockPool.serve`` and a lower
tier's insert ask before they change anything, so where it and the mechanism
disagree a caller either refuses a request that fits or starts one that raises
half-way. The property test drives random pools (held, pinned and repeated
hits, leaf-only refusals, growable pools) and checks, on a copy, that
``allocate`` succeeds exactly when the rule says so, with the victims it
counted, and raises the rule's own error otherwise with the pool unchanged.
``KVPool``'s admission and ``BlockPool.serve`` take or refuse the same requests,
repeated hits included (a block named twice is one block of the pool).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.block_pool_room import Room, room, room_error
from sagellm_kv_cache.errors import KVBudgetExceededError, KVNoVictimError, KVPoolFullError
from sagellm_kv_cache.pool import KVPool
from tests.test_block_pool_serve import state


def _pool(policy: str = "lru", **kw) -> BlockPool:
    """6 blocks: a, b, c, d cached on blocks 0-3 (evictable), 4 and 5 free."""
    bp = BlockPool(6, 16, policy, **kw)
    assert bp.serve(["a", "b", "c", "d"]) == ([0, 1, 2, 3], 0)
    return bp


def test_free_blocks_first_then_victims() -> None:
    bp = _pool()
    assert room(bp, 0) == Room(None, 2, 4, 0)
    assert room(bp, 2) == Room(None, 2, 4, 0)
    assert room(bp, 5) == Room(None, 2, 4, 3)
    assert room(bp, 6) == Room(None, 2, 4, 4)
    assert room(bp, 7) == Room("no_blocks", 2, 4, 4)
    assert room(bp, 7).obtainable == 6 and room(bp, 7).supply == 6


def test_an_evictable_hit_is_no_victim() -> None:
    bp = _pool()
    # blocks 0 and 1 will be taken by the request: 2 victims are left
    assert room(bp, 4, [0, 1]) == Room(None, 2, 2, 2)
    assert room(bp, 5, [0, 1]) == Room("no_blocks", 2, 2, 2)
    # a held hit is no victim anyway: holding it changes nothing more
    bp.touch([0])
    assert room(bp, 5, [0, 1]) == Room("no_blocks", 2, 2, 2)
    assert room(bp, 5, [1]) == Room("no_blocks", 2, 2, 2)


def test_a_repeated_hit_counts_once() -> None:
    bp = _pool()
    # the request names block 0 three times; it takes one block out of the policy
    assert room(bp, 5, [0, 0, 0]) == Room(None, 2, 3, 3)
    assert room(bp, 6, [0, 0, 0]) == Room("no_blocks", 2, 3, 3)


def test_blocks_in_use_are_neither_free_nor_evictable() -> None:
    bp = _pool()
    bp.allocate(2)  # the free ones
    bp.pin([3])
    assert room(bp, 3) == Room(None, 0, 3, 3)
    assert room(bp, 4) == Room("no_blocks", 0, 3, 3)


def test_a_growable_pool_counts_its_growth_room_as_free() -> None:
    bp = BlockPool(2, 16, growable=True, max_num_blocks=5)
    bp.serve(["a", "b"])
    assert bp.num_free == 0 and bp.growth_room == 3
    assert room(bp, 3) == Room(None, 3, 2, 0)
    assert room(bp, 4) == Room(None, 3, 2, 1)
    assert room(bp, 6) == Room("no_blocks", 3, 2, 2)


def test_a_refusing_policy_is_asked_how_many_victims_it_gives() -> None:
    bp = _pool("leaf:lru")
    # d (block 3) in use: a, b, c have an in-use descendant, so none is a leaf victim
    bp.touch([3])
    assert room(bp, 2) == Room(None, 2, 3, 0)
    r = room(bp, 3)
    assert r == Room("no_victims", 2, 3, 0)
    err = room_error(bp, r, 3)
    assert isinstance(err, KVNoVictimError) and err.code == "KV_NO_VICTIM"
    assert "need 1 victims beyond 2 free blocks; the policy gives 0 now" in str(err)
    before = state(bp)
    with pytest.raises(KVNoVictimError):
        bp.allocate(3)
    assert state(bp) == before


def test_room_error_of_a_full_pool_names_the_counts() -> None:
    bp = _pool()
    r = room(bp, 7)
    err = room_error(bp, r, 7)
    assert isinstance(err, KVPoolFullError)
    assert str(err).endswith("need 7 blocks, only 2 free + 4 evictable of 6")


def test_serve_raises_the_rules_error_with_the_pool_unchanged() -> None:
    bp = _pool("leaf:lru")
    bp.touch([3])  # d in use: no victim
    before = state(bp)
    with pytest.raises(KVNoVictimError, match="need 1 victims beyond 2 free"):
        bp.serve(["x", "y", "z"])
    assert state(bp) == before


POLICIES = ["lru", "fifo", "lfu", "s3fifo", "arc", "leaf:lru", "leaf:fifo"]
PROMPTS = ["abcde", "abxyz", "abxqr", "fghij", "fgkaa"]

_ops = st.lists(
    st.one_of(
        # prefixes of a few prompts that share their starts: a tree of cached blocks
        # (leaf-only policies refuse the parents of held blocks)
        st.tuples(st.just("serve"), st.tuples(st.sampled_from(PROMPTS), st.integers(1, 5))),
        st.tuples(st.just("hold"), st.integers(0, 9)),
        st.tuples(st.just("pin"), st.integers(0, 9)),
        st.tuples(st.just("unpin"), st.integers(0, 9)),
    ),
    max_size=12,
)


@settings(max_examples=300)
@given(
    policy=st.sampled_from(POLICIES),
    size=st.integers(1, 8),
    growable=st.booleans(),
    ops=_ops,
    picks=st.lists(st.integers(0, 9), max_size=4),
    extra=st.integers(-2, 5),
)
def test_room_predicts_touch_then_allocate(policy, size, growable, ops, picks, extra) -> None:
    kw = {"growable": True, "max_num_blocks": size + 2} if growable else {}
    bp = BlockPool(size, 16, policy, **kw)
    for op, arg in ops:
        cached = [b for b in range(bp.num_blocks) if bp.block_hashes[b] is not None]
        if op == "serve":
            prompt, n = arg
            hs = [prompt[:i] for i in range(1, n + 1)]  # chained: a block's hash names its prefix
            if len(hs) <= bp.num_blocks:
                with contextlib.suppress(KVPoolFullError, KVNoVictimError):
                    bp.serve(hs)
        elif op == "hold" and cached:
            bp.touch([cached[arg % len(cached)]])
        elif op == "pin" and cached:
            bp.pin([cached[arg % len(cached)]])
        elif op == "unpin":
            pinned = [b for b in range(bp.num_blocks) if bp.pin_counts[b]]
            if pinned:
                bp.unpin([pinned[arg % len(pinned)]])
    cached = [b for b in range(bp.num_blocks) if bp.block_hashes[b] is not None]
    hits = [cached[p % len(cached)] for p in picks] if cached else []  # repeats occur
    need = max(0, bp.num_free + bp.growth_room + extra)  # about where victims are needed
    before = state(bp)
    r = room(bp, need, hits)
    assert state(bp) == before  # the rule changes nothing
    assert r.supply <= r.obtainable and r.victims <= r.evictable
    trial = copy.deepcopy(bp)
    trial.touch(hits)
    evictions = trial.num_evictions
    if r.reason is None:
        trial.allocate(need)
        assert trial.num_evictions - evictions == r.victims
    else:
        taken = state(trial)
        err = room_error(bp, r, need)
        with pytest.raises(type(err)):
            trial.allocate(need)
        assert state(trial) == taken


def _kv_pool(hashes: list) -> KVPool:
    """A metadata-only KVPool of 6 blocks of 16 tokens with ``hashes`` cached and evictable."""
    p = KVPool(max_tokens=6 * 16, block_size=16)
    if hashes:
        h, _ = p.alloc_with_prefix(block_hashes=hashes, num_tokens=16 * len(hashes))
        p.cache_blocks(h)
        p.free(h)
    return p


def test_kv_pool_admits_a_request_naming_a_block_four_times_as_serve_does() -> None:
    p = _kv_pool(list("abcdef"))
    hs = ["a"] * 4 + ["x", "y", "z"]  # one cached block, named four times, and 3 new
    hit = p.block_pool.match_prefix(hs)
    assert hit == [0, 0, 0, 0]
    assert p.peek_admission(3, hit) is None  # 4 distinct blocks of 6, 5 obtainable
    assert copy.deepcopy(p.block_pool).serve(hs) == ([0, 0, 0, 0, 5, 4, 3], 4)
    h, hit_tokens = p.alloc_with_prefix(block_hashes=hs, num_tokens=16 * len(hs))
    assert (h.block_ids, hit_tokens) == ([0, 0, 0, 0, 5, 4, 3], 64)  # victims: LRU order
    p.free(h)
    p.check_invariants()


@settings(max_examples=200)
@given(
    cached=st.lists(st.sampled_from("abcdefgh"), max_size=6, unique=True),
    hs=st.lists(st.sampled_from("abcdxyz"), min_size=1, max_size=9),
)
def test_kv_pool_admission_agrees_with_serve(cached, hs) -> None:
    """A request's admission by ``KVPool`` (``peek_admission`` and ``alloc_with_prefix``)
    and by ``BlockPool.serve`` on a copy of its block pool: both take it or neither."""
    p = _kv_pool(cached)
    hit = p.block_pool.match_prefix(hs)
    admitted = p.peek_admission(len(hs) - len(hit), hit) is None
    trial = copy.deepcopy(p.block_pool)
    try:
        trial.serve(hs)
        served = True
    except KVPoolFullError:
        served = False
    assert admitted == served
    before = p.get_stats()
    try:
        h, _ = p.alloc_with_prefix(block_hashes=hs, num_tokens=16 * len(hs))
    except KVBudgetExceededError:
        assert not admitted and p.get_stats() == before
    else:
        assert admitted
        p.free(h)
    p.check_invariants()
