"""``BlockPool.serve`` equals match, touch, allocate, cache and release, move for move.

Two pools take the same random stream of operations: one serves each request
with ``serve``, the other with the five calls (``test_block_pool.run_request``). Between
requests some blocks are held (a request taken and not released), pinned or
unpinned on both, so hits that are held, pinned, repeated, and misses whose
hash is cached further on all occur. After every step the two pools agree on
the request's block ids and hit count, every per-block list, the free queue,
the hash map, the counters and the policy's whole victim order; with hooks
attached they saw the same events in the same order. A request that does not
fit raises from ``serve`` with the pool unchanged.
"""

from __future__ import annotations

from copy import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.errors import (
    KVInvalidInputError,
    KVInvalidTypeError,
    KVNoVictimError,
    KVPoolFullError,
)
from sagellm_kv_cache.hooks import PoolHook
from tests.test_block_pool import run_request  # the reference: the five calls

POLICIES = ["lru", "fifo", "lfu", "s3fifo", "arc", "slru", "mru", "leaf:lru"]


def fits(bp: BlockPool, hashes: list) -> bool:
    """Would the request's new blocks be had once its hits are taken (public API only)?"""
    hit = bp.match_prefix(hashes)
    n_new = len(hashes) - len(hit)
    extra = n_new - bp.num_free
    if extra <= 0:
        return True
    extra -= min(extra, bp.growth_room)
    ev = list(dict.fromkeys(bp.evictable_among(hit)))  # a repeated hit leaves once
    if extra > len(bp.policy) - len(ev):
        return False
    return extra <= 0 or not bp.policy_may_refuse or bp.policy.num_victims(extra, ev) >= extra


class Recorder(PoolHook):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_evict_many(self, block_ids, block_hashes, reason, timestamp) -> None:
        self.events.append(("evict", list(block_ids), list(block_hashes), reason))

    def on_blocks_cached(self, block_ids, block_hashes, parent_hash, timestamp) -> None:
        self.events.append(("cached", list(block_ids), list(block_hashes), parent_hash))


#: the pool's per-block lists, free queue, hash map and counters
STATE = [
    "ref_counts",
    "pin_counts",
    "block_hashes",
    "parent_ids",
    "free_queue",
    "cached",
    "num_blocks",
    "num_evictions",
    "num_cached_total",
    "evictions_by_reason",
]


def state(bp: BlockPool) -> tuple:
    """Everything a later operation can see: ``STATE`` (copies), the hash map's
    insertion order and the policy's whole victim order."""
    return (
        *(copy(getattr(bp, name)) for name in STATE),
        list(bp.cached),
        bp.policy.peek_victims(len(bp.policy)),
    )


def make_pair(policy: str, num_blocks: int, growable: bool, hooked: bool):
    def one() -> BlockPool:
        if growable:
            return BlockPool(
                num_blocks // 2,
                policy=policy,
                clock=lambda: 0.0,
                growable=True,
                max_num_blocks=num_blocks,
            )
        return BlockPool(num_blocks, policy=policy, clock=lambda: 0.0)

    a, b = one(), one()
    recs = (Recorder(), Recorder()) if hooked else None
    if recs:
        a.hooks.append(recs[0])
        b.hooks.append(recs[1])
    return a, b, recs


# a request: a prefix of one of a few chains (shared prefixes, as chained hashes give),
# or a few hashes from a small alphabet (repeats, a cached hash after a miss)
chain_req = st.tuples(st.integers(0, 3), st.integers(0, 9)).map(
    lambda t: [f"c{t[0]}-{i}" for i in range(t[1])]
)
free_req = st.lists(st.integers(0, 11), max_size=8)
request = st.one_of(chain_req, free_req)
op = st.one_of(
    *[st.tuples(st.just("serve"), request)] * 6,
    st.tuples(st.just("hold"), request),
    st.tuples(st.just("again"), st.tuples(st.integers(0, 7), free_req)),
    *[st.tuples(st.just("drop"), st.integers(0, 7))] * 2,
    st.tuples(st.just("pin"), st.integers(0, 31)),
    *[st.tuples(st.just("unpin"), st.integers(0, 7))] * 2,
)
#: mostly False: a plain fixed pool without hooks is the one the LRU path serves
rarely = st.sampled_from([False, False, False, True])


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=150)
@given(
    num_blocks=st.integers(2, 14),
    growable=rarely,
    hooked=rarely,
    ops=st.lists(op, max_size=40),
)
def test_serve_equals_the_five_calls(policy, num_blocks, growable, hooked, ops):
    check_stream(policy, num_blocks, growable, hooked, ops)


#: streams that reach each branch for sure (random streams reach them often, not
#: always): a held hit, a held hit in an all-hit request, a hash repeated among the
#: misses while evicting, a miss whose hash is cached further on, a hit among the
#: victims, a refused victim
BRANCHES = [
    (6, [("hold", ["a", "b"]), ("serve", ["a", "b", "c"]), ("drop", 0), ("serve", ["a"])]),
    (4, [("hold", ["a"]), ("serve", ["a"]), ("serve", ["a", "x"]), ("drop", 0)]),
    (3, [("serve", [1, 2, 3]), ("serve", [4, 4]), ("serve", [5, 6, 5])]),
    (4, [("serve", [1, 2]), ("serve", [3, 4]), ("serve", [5, 1, 2]), ("serve", [6, 3])]),
    (3, [("serve", [1]), ("serve", [2, 1]), ("serve", [3, 4, 1])]),
    # a hit at the least recent end: passed over as a victim, in both branches
    (3, [("serve", [1]), ("serve", [2, 3]), ("serve", [1, 4])]),
    (3, [("serve", [1]), ("serve", [2, 3]), ("serve", [1, 5, 2])]),
    # a pinned child: leaf-only refuses its parent (KVNoVictimError, nothing changed)
    (3, [("serve", [1, 2]), ("pin", 1), ("serve", ["x", "y"]), ("unpin", 0), ("serve", [1, 3])]),
]


@pytest.mark.parametrize("policy", ["lru", "fifo", "leaf:lru"])
@pytest.mark.parametrize(("num_blocks", "ops"), BRANCHES)
@pytest.mark.parametrize("hooked", [False, True])
def test_serve_branches(policy, num_blocks, ops, hooked):
    check_stream(policy, num_blocks, False, hooked, ops)


def check_stream(policy, num_blocks, growable, hooked, ops):
    a, b, recs = make_pair(policy, num_blocks, growable, hooked)
    held: list[tuple[list[int], list]] = []
    pinned: list[int] = []
    for kind, arg in ops:
        if kind == "again":  # a held request's hashes and more: its hits are held
            if not held:
                continue
            kind, arg = "serve", held[arg[0] % len(held)][1] + arg[1]
        if kind == "serve":
            before = state(a)
            if not fits(a, arg):
                with pytest.raises((KVPoolFullError, KVNoVictimError)):
                    a.serve(list(arg))
                assert state(a) == before  # refused with nothing changed
                continue
            got = a.serve(list(arg))
            k = len(b.match_prefix(arg))
            assert got == (run_request(b, list(arg)), k)  # the same ids, the same hit count
        elif kind == "hold":
            if not fits(a, arg):  # the five calls are not undone on a refusal
                continue
            ids = run_request(a, list(arg), keep=True)
            assert run_request(b, list(arg), keep=True) == ids
            held.append((ids, list(arg)))
        elif kind == "drop":
            if held:
                ids = held.pop(arg % len(held))[0]
                a.release(ids)
                b.release(ids)
        elif kind == "pin":
            blk = arg % a.num_blocks
            if a.ref_counts[blk] or a.pin_counts[blk] or a.block_hashes[blk] is not None:
                a.pin([blk])
                b.pin([blk])
                pinned.append(blk)
        elif pinned:
            blk = pinned.pop(arg % len(pinned))
            a.unpin([blk])
            b.unpin([blk])
        assert state(a) == state(b)
        if recs:
            assert recs[0].events == recs[1].events
    a.check_invariants()


def test_serve_in_a_plain_lru_pool_gives_the_documented_order():
    """Tail-first release: the suffix is evicted before the prefix; a hit refreshes."""
    bp = BlockPool(4)
    assert bp.serve(["a", "b", "c"]) == ([0, 1, 2], 0)
    assert bp.policy.peek_victims(3) == [2, 1, 0]
    assert bp.serve(["a", "x"]) == ([0, 3], 1)  # the free block first
    assert bp.policy.peek_victims(4) == [2, 1, 3, 0]
    assert bp.serve(["a", "y", "z"]) == ([0, 2, 1], 1)  # c's block, then b's
    assert bp.num_evictions == 2 and "b" not in bp.cached and "c" not in bp.cached
    assert bp.parent_ids[2] == 0 and bp.parent_ids[1] == 2
    bp.check_invariants()


@pytest.mark.parametrize(
    ("hashes", "error"),
    [
        (["a", None], KVInvalidInputError),
        (["a", ["b"]], KVInvalidTypeError),
        ("ab", KVInvalidTypeError),
    ],
)
def test_serve_bad_hashes_change_nothing(hashes, error):
    bp = BlockPool(4)
    bp.serve(["a"])
    before = state(bp)
    with pytest.raises(error):
        bp.serve(hashes)
    assert state(bp) == before


def test_serve_takes_any_sequence():
    bp = BlockPool(4)
    assert bp.serve(("a", "b")) == ([0, 1], 0)
    assert bp.serve(("a", "b")) == ([0, 1], 2)


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "s3fifo", "arc"])
def test_sequential_replay_equals_the_three_engine_steps(policy, monkeypatch):
    """The simulator's sequential loop through ``BlockPool.serve`` gives the records
    that ``start``, ``written`` and ``finish`` give, request for request."""
    from sim.instances import Instance, PoolInstance
    from sim.replay import replay_sequential
    from traces import generate_trace

    table = generate_trace(400, seed=3, block_size=16, multi_turn_prob=0.5)
    calls = []
    serve = BlockPool.serve
    monkeypatch.setattr(BlockPool, "serve", lambda bp, hs: calls.append(1) or serve(bp, hs))
    one_pass = replay_sequential(table, 60, policy)
    fits = [0 < n // 16 <= 60 for n in table["input_length"].to_list()]
    assert len(calls) == sum(fits) > 100  # every request that fits went through serve
    monkeypatch.setattr(PoolInstance, "serve", Instance.serve)
    three_steps = replay_sequential(table, 60, policy)
    assert one_pass.records.equals(three_steps.records)
    assert one_pass.summary() == three_steps.summary()
