"""LeafOnly: only blocks with no cached child are victims; batches uncover parents;
pop_victims is all-or-nothing."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.errors import KVConfigError, KVNoVictimError, KVPoolFullError
from sagellm_kv_cache.eviction import LeafOnly, LRUPolicy, S3FIFOPolicy, make_policy
from sagellm_kv_cache.prefix_cache import PrefixCache


def run_request(bp: BlockPool, hashes: list, *, keep: bool = False) -> list[int]:
    hit = bp.match_prefix(hashes)
    bp.touch(hit)
    ids = hit + bp.allocate(len(hashes) - len(hit))
    bp.cache_blocks(ids, hashes, len(hit))
    if not keep:
        bp.release(ids)
    return ids


def snapshot(bp: BlockPool) -> tuple:
    return (
        list(bp.free_queue),
        list(bp.ref_counts),
        list(bp.block_hashes),
        len(bp.policy),
        bp.policy.peek_victims(bp.num_blocks),
    )


def test_registry_scheme():
    p = make_policy("leaf:lru")
    assert isinstance(p, LeafOnly) and isinstance(p.inner, LRUPolicy)
    assert p.name == "leaf:lru"
    q = make_policy("s3fifo", leaf_only=True)
    assert isinstance(q.inner, S3FIFOPolicy) and q.tracks_hits
    r = make_policy(LRUPolicy(), leaf_only=True)
    assert isinstance(r, LeafOnly)
    with pytest.raises(KVConfigError):
        make_policy("leaf:nope")
    with pytest.raises(KVConfigError):
        LeafOnly(LeafOnly(LRUPolicy()))
    with pytest.raises(KVConfigError):
        LeafOnly("lru")


def test_suffix_then_uncovered_prefix_in_one_batch():
    """a-b-c released tail-first: only c is a victim; evicting c uncovers b in the
    same batch. A held request a-x keeps a blocked (its child x is cached)."""
    bp = BlockPool(6, policy="leaf:lru")
    assert run_request(bp, ["a", "ab", "abc"]) == [0, 1, 2]
    assert len(bp.policy) == 3 and bp.policy.num_blocked == 2
    assert bp.policy.peek_victims(10) == [2, 1, 0]
    held = run_request(bp, ["a", "ax"], keep=True)
    assert held == [0, 3]
    assert bp.policy.peek_victims(10) == [2, 1]
    assert bp.evict(2) == [2, 1]
    assert bp.evict(1) == []  # nothing evictable: a is in use
    bp.release(held)  # x (leaf) first, then a (blocked by x)
    assert bp.policy.peek_victims(10) == [3, 0]
    assert bp.evict(5) == [3, 0]
    bp.check_invariants()


def test_allocation_is_all_or_nothing():
    bp = BlockPool(2, policy="leaf:lru")
    ids = run_request(bp, ["a", "ab"], keep=True)
    bp.release(ids[:1])  # a evictable, but its child ab is in use
    assert len(bp.policy) == 1 and bp.policy.num_blocked == 1
    before = snapshot(bp)
    with pytest.raises(KVNoVictimError) as err:
        bp.allocate(1)
    assert err.value.code == KVNoVictimError.code
    assert snapshot(bp) == before
    with pytest.raises(KVNoVictimError):
        bp.policy.pop_victims(1)
    assert snapshot(bp) == before
    bp.release(ids[1:])
    assert bp.allocate(2) == [1, 0]  # ab, then the a it uncovered
    bp.check_invariants()


def test_pop_victims_partial_batch_changes_nothing():
    bp = BlockPool(6, policy="leaf:lru")
    run_request(bp, ["a", "ab"])  # 0, 1
    held = run_request(bp, ["c", "cd"], keep=True)  # 2, 3
    bp.release(held[:1])  # c blocked by the held cd
    assert len(bp.policy) == 3
    before = snapshot(bp)
    with pytest.raises(KVNoVictimError):
        bp.policy.pop_victims(3)  # ab, a are reachable; c is not
    assert snapshot(bp) == before
    assert [bp.policy.available_victims(k) for k in (1, 2, 3, 9)] == [1, 2, 2, 2]
    assert bp.policy.pop_victims(2) == [1, 0]


def test_invalidated_parent_stops_blocking_and_reused_ids_start_clean():
    bp = BlockPool(4, policy="leaf:lru")
    run_request(bp, ["a", "ab"])  # 0, 1; a blocked by ab
    bp.uncache(1)  # ab dropped without eviction: a becomes a leaf
    assert bp.policy.peek_victims(4) == [0]
    run_request(bp, ["p", "pq"])  # free queue 2, 3 first
    ids = run_request(bp, ["z"])  # block 1 again, under a new hash
    assert ids == [1]
    assert bp.policy.num_blocked == 1  # only p (blocked by pq)
    bp.uncache(2)  # p dropped: pq is a root now; nothing blocks
    assert bp.policy.num_blocked == 0
    bp.check_invariants()


@pytest.mark.parametrize("inner", ["lru", "s3fifo", "arc", "slru"])
def test_standalone_prefix_cache(inner):
    pc = PrefixCache(block_size=2, max_cached_blocks=4, eviction_policy=f"leaf:{inner}")
    hs = pc.compute_block_hashes([1, 2, 3, 4, 5, 6])
    pc.insert(hs, [10, 11, 12])
    assert pc.evict_by_count(1) == 1
    assert pc.lookup(hs) == ([10, 11], 4)  # the suffix went, the prefix stays reachable


# -- property: never evict a block while a block cached under it is still cached ---

paths = st.lists(st.integers(0, 1), min_size=1, max_size=4).map(tuple)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), paths),
        st.tuples(st.just("alloc"), paths),
        st.tuples(st.just("cache"), st.integers(0, 7)),
        st.tuples(st.just("release"), st.integers(0, 7), st.integers(1, 4)),
        st.tuples(st.just("touch"), paths),
        st.tuples(st.just("evict"), st.integers(1, 4)),
        st.tuples(st.just("uncache"), st.integers(0, 50)),
        st.tuples(st.just("pin"), st.integers(0, 50)),
        st.tuples(st.just("unpin"), st.integers(0, 5)),
    ),
    min_size=20,
    max_size=80,
)


class Tracker:
    """Caching incarnations and parent links as the pool reports them (independent of LeafOnly)."""

    def __init__(self, bp: BlockPool, victim_log: list[int]) -> None:
        self.bp = bp
        self.log = victim_log
        self.inc = [0] * bp.num_blocks
        self.edge: dict[int, tuple[int, int]] = {}  # child -> (parent, parent's incarnation)
        self.n = 0

    def cache(self, ids, hashes, start):
        bp = self.bp
        before = list(bp.block_hashes)
        bp.cache_blocks(ids, hashes, start)
        for b in ids:
            if before[b] is None and bp.block_hashes[b] is not None:
                self.n += 1
                self.inc[b] = self.n
                p = bp.parent_ids[b]
                if p >= 0 and bp.block_hashes[p] is not None:
                    self.edge[b] = (p, self.inc[p])
                else:
                    self.edge.pop(b, None)

    def evicting(self, fn, *args):
        """Run ``fn`` (which may evict); check each victim had no cached child left."""
        bp = self.bp
        inc_before = list(self.inc)
        n0 = bp.num_evictions
        cached_before = {b for b, h in enumerate(bp.block_hashes) if h is not None}
        out = fn(*args)
        victims = [b for b in cached_before if bp.block_hashes[b] is None]
        assert len(victims) == bp.num_evictions - n0
        assert sorted(self.log[len(self.log) - len(victims) :]) == sorted(victims)
        order = {b: i for i, b in enumerate(self.log[len(self.log) - len(victims) :])}
        for c, (p, ip) in self.edge.items():
            if p in order and ip == inc_before[p]:
                child_alive = c in cached_before and self.inc[c] == inc_before[c]
                if not child_alive:
                    continue
                # the child must be evicted in the same batch, before its parent
                assert c in order and order[c] < order[p], (c, p, order)
        for v in victims:
            self.inc[v] = 0
        return out


class LoggingLeaf(LeafOnly):
    """LeafOnly that records the victims it hands out, in order."""

    def pop_victims(self, n):
        out = super().pop_victims(n)
        self.log.extend(out)
        return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 10), st.sampled_from(["lru", "s3fifo"]), ops)
def test_no_block_evicted_before_its_descendants(capacity, inner, events):
    policy = LoggingLeaf(make_policy(inner))
    policy.log = []
    bp = BlockPool(capacity, policy=policy)
    tr = Tracker(bp, policy.log)
    pending: list[list] = []  # [ids, hashes, start, cached, held ids]
    pinned: list[int] = []
    for op in events:
        kind = op[0]
        if kind in ("alloc", "touch"):
            hs = [op[1][: i + 1] for i in range(len(op[1]))]
            hit = bp.match_prefix(hs)
            need = 0 if kind == "touch" else len(hs) - len(hit)
            if need > bp.num_available - bp.num_evictable_among(hit):
                continue
            bp.touch(hit)
            before = (list(bp.free_queue), list(bp.block_hashes), len(bp.policy))
            try:
                new = tr.evicting(bp.allocate, need)
            except KVNoVictimError:
                assert (list(bp.free_queue), list(bp.block_hashes), len(bp.policy)) == before
                bp.release(hit)
                continue
            except KVPoolFullError:  # pragma: no cover - excluded by the check above
                raise
            ids = hit + new
            pending.append([ids, hs[: len(ids)], len(hit), kind == "touch", list(ids)])
        elif kind == "cache" and pending:
            req = pending[op[1] % len(pending)]
            if not req[3] and len(req[4]) == len(req[0]):  # all blocks still held
                tr.cache(req[0], req[1], req[2])
                req[3] = True
        elif kind == "release" and pending:
            i = op[1] % len(pending)
            req = pending[i]
            k = min(op[2], len(req[4]))
            bp.release(req[4][:k])  # prefix first: parents may wait on held children
            del req[4][:k]
            if not req[4]:
                pending.pop(i)
        elif kind == "evict":
            before = (list(bp.free_queue), list(bp.block_hashes), len(bp.policy))
            try:
                tr.evicting(bp.evict, op[1])
            except KVNoVictimError:
                assert (list(bp.free_queue), list(bp.block_hashes), len(bp.policy)) == before
        elif kind == "uncache" and bp.cached:
            b = sorted(bp.cached.values())[op[1] % len(bp.cached)]
            bp.uncache(b)
            tr.inc[b] = 0
        elif kind == "pin" and bp.cached:
            b = sorted(bp.cached.values())[op[1] % len(bp.cached)]
            bp.pin([b])
            pinned.append(b)
        elif kind == "unpin" and pinned:
            bp.unpin([pinned.pop(op[1] % len(pinned))])
        bp.check_invariants()
        assert len(bp.policy) == len(policy.inner) + policy.num_blocked
    # liveness: with nothing in use, every evictable block can go, leaves first
    for req in pending:
        bp.release(req[4])
    bp.unpin(pinned)
    n = len(bp.policy)
    assert len(tr.evicting(bp.evict, n)) == n
    assert not bp.cached and policy.num_blocked == 0
    bp.check_invariants()
