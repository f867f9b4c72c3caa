"""Every keyed policy against its own stated key; every policy's peek against its pops.

(1) fifo, mru, lfu, priority and ttl state their key (``policy.key(b)``, the
definition in each class docstring): on random event sequences through a real
``BlockPool`` the victim order is the evictable, unprotected blocks sorted by
that key, after every step, and the drain pops in that order.
(2) A peek changes nothing: two pools run the same random program, one
peeking between steps, and stay equal; ``peek_victims(k)`` is what
``pop_victims(k)`` on a copy gives, for every registered policy and the
leaf-only wrappers (whose peek cascades through the inner policy's).
(3) The lazy heap's peek (with blocks counted as pushed on the way) equals a
sort, and drops the stale entries it walks over.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_eviction_policies_basic import NUM_BLOCKS, Clock, apply, ops

from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.eviction import KeyedPolicy, make_policy
from sagellm_kv_cache.eviction._lazyheap import LazyHeap
from sagellm_kv_cache.eviction.registry import POLICIES

KEYED = ["fifo", "mru", "lfu", "priority", "ttl"]
ALL = sorted(POLICIES) + ["leaf:lru", "leaf:fifo", "leaf:lfu", "leaf:s3fifo", "leaf:arc"]
ALL += ["leaf:slru", "leaf:ttl", "leaf:predictive"]
PRELUDE = [("req", "xyz", False), ("req", "zy", False)]  # start with 5 cached blocks


def evictable(bp: BlockPool) -> list[int]:
    return [b for b in range(bp.num_blocks) if b in bp.policy]


@pytest.mark.parametrize("name", KEYED)
def test_keyed_policies_are_keyed(name):
    assert isinstance(make_policy(name), KeyedPolicy)


@pytest.mark.parametrize("name", KEYED)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(ops, max_size=50))
def test_victims_sorted_by_the_stated_key(name, program):
    clock = Clock()
    bp = BlockPool(NUM_BLOCKS, policy=name, clock=clock)
    policy = bp.policy
    held: list[list[int]] = []
    for step, op in enumerate(PRELUDE + program):
        if op[0] == "tick":
            clock.t += op[1]
        else:
            apply(bp, held, op)
        eligible = [b for b in evictable(bp) if not policy.is_protected(b)]
        want = sorted(eligible, key=policy.key)
        assert policy.peek_victims(NUM_BLOCKS) == want, f"step {step} {op}"
        assert [policy.key(b) for b in want] == sorted(policy.key(b) for b in want)
    for ids in held:
        bp.release(ids)
    want = sorted((b for b in evictable(bp) if not policy.is_protected(b)), key=policy.key)
    assert policy.pop_victims(len(want)) == want


def keyed_reference(name: str, clock: Clock):
    """The policy with its fast paths off: no release-order lane (every block on the heap)
    and no kept entries (every release files the block again)."""
    p = make_policy(name, clock)
    p._lane_k0 = None
    p._keep_entries = False
    return p


def peek_state(bp: BlockPool) -> tuple:
    """What a peek could disturb, seen from outside the policy."""
    return (
        list(bp.free_queue),
        dict(bp.cached),
        list(bp.ref_counts),
        len(bp.policy),
        bp.num_evictions,
    )


def lockstep(a: BlockPool, b: BlockPool, program: list, clock: Clock, between=None) -> None:
    """Run the prelude and ``program`` on pools ``a`` and ``b`` alike: the same results and
    states after every step (``between(step)`` runs before each), then release what they
    hold and drain both: the same victims."""
    held_a: list[list[int]] = []
    held_b: list[list[int]] = []
    for step, op in enumerate(PRELUDE + program):
        if between is not None:
            between(step)
        if op[0] == "tick":
            clock.t += op[1]
        else:
            assert apply(a, held_a, op) == apply(b, held_b, op), f"step {step} {op}"
        assert peek_state(a) == peek_state(b), f"step {step} {op}"
    for bp, held in ((a, held_a), (b, held_b)):
        for ids in held:
            bp.release(ids)
    n = b.policy.num_victims(NUM_BLOCKS)
    assert a.policy.pop_victims(n) == b.policy.pop_victims(n)


@pytest.mark.parametrize("name", KEYED)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(ops, max_size=50))
def test_fast_paths_equal_the_keyed_reference(name, program):
    """The lane (blocks released in key order kept in an OrderedDict) and FIFO's kept
    entries (dormant while in use) change the speed, never the order."""
    clock = Clock()
    fast = BlockPool(NUM_BLOCKS, policy=name, clock=clock)
    ref = BlockPool(NUM_BLOCKS, policy=keyed_reference(name, clock), clock=clock)

    def same_order(step: int) -> None:
        assert fast.policy.peek_victims(NUM_BLOCKS) == ref.policy.peek_victims(NUM_BLOCKS)

    lockstep(fast, ref, program, clock, same_order)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(ops, max_size=40), ks=st.lists(st.integers(0, NUM_BLOCKS + 1)))
def test_peek_changes_nothing_and_is_the_pop_order(name, program, ks):
    """One pool peeks before every step, the other never: they stay equal, and what a peek
    names is what a copy of the policy pops."""
    clock = Clock()
    peeked = BlockPool(NUM_BLOCKS, policy=name, clock=clock)

    def peek(step: int) -> None:
        k = ks[step % len(ks)] if ks else 1
        seen = peeked.policy.peek_victims(k)
        twin = copy.deepcopy(peeked.policy, {id(clock): clock})
        n = twin.num_victims(k)
        assert twin.pop_victims(n) == seen[:n], f"step {step}"
        assert seen == peeked.policy.peek_victims(NUM_BLOCKS)[:k]

    lockstep(peeked, BlockPool(NUM_BLOCKS, policy=name, clock=clock), program, clock, peek)


@pytest.mark.parametrize("name", ["s3fifo", "arc", "slru", "lfu", "leaf:lru", "leaf:s3fifo"])
def test_peek_of_a_large_policy_matches_its_pops(name):
    """Hits, chains and a cascade over 2,000 blocks: peek(300) is the next 300 pops."""
    p = make_policy(name)
    p.set_capacity(2000)
    for b in range(2000):
        p.on_cached(b, ("h", b), b - 1 if b % 8 else -1)
    if p.tracks_hits:
        for b in range(0, 2000, 3):
            p.on_hit(b)
            if b % 2:
                p.on_hit(b)
    for start in range(0, 2000, 8):
        p.add_many(reversed(range(start, start + 8)))
    seen = p.peek_victims(300)
    assert len(seen) == 300
    assert p.pop_victims(300) == seen


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["push", "discard"]), st.integers(0, 30), st.integers(0, 5)),
        max_size=120,
    ),
    st.integers(0, 40),
    st.lists(st.integers(0, 30), max_size=10),
)
def test_lazy_heap_peek_is_a_sort_and_sheds_stale_entries(events, n, extra):
    h = LazyHeap()
    keys: dict[int, tuple] = {}
    token = 0
    for kind, b, k in events:
        if kind == "push":
            token += 1
            h.push(b, k, b)
            keys[b] = (k, b, token)
        elif h.discard(b):
            del keys[b]
    # blocks counted as pushed after each answer: they sort after real ties
    added = iter(x for x in extra if x not in keys)
    virtual: list[tuple] = []

    def after(b):
        x = next(added, None)
        if x is None:
            return None
        virtual.append(((x % 6, x, float("inf")), x))
        return x % 6, x, x

    got = h.peek(n, after)
    pool = sorted(keys.items(), key=lambda kv: kv[1])
    # a reference merge: the smallest of what is left, virtual ones joining as they come
    want: list[int] = []
    live = [(key, b) for b, key in pool]
    virtual.clear()
    added = iter(x for x in extra if x not in keys)
    while len(want) < n and (live or virtual):
        cands = sorted(live + virtual)
        key, b = cands[0]
        (live if (key, b) in live else virtual).remove((key, b))
        want.append(b)
        after(b)
    assert got == want
    assert len(h._heap) <= 2 * len(h) + 33
    assert h.peek(len(h)) == [b for b, _ in pool]
    assert [h.pop() for _ in range(len(h))] == [b for b, _ in pool]
