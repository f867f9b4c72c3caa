"""S3-FIFO, ARC and SLRU: exact victim orders through a real BlockPool, and
differential tests against short list-based reference implementations."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.errors import KVConfigError, KVNoVictimError
from sagellm_kv_cache.eviction import (
    ARCPolicy,
    EvictionPolicy,
    EvictionPolicyName,
    S3FIFOPolicy,
    SLRUPolicy,
    make_policy,
)
from sagellm_kv_cache.prefix_cache import PrefixCache

# -- table driver ------------------------------------------------------------


def run_request(bp: BlockPool, hashes: list, *, keep: bool = False) -> list[int]:
    """Lookup, take hits, allocate the rest, cache, release (unless keep)."""
    hit = bp.match_prefix(hashes)
    bp.touch(hit)
    ids = hit + bp.allocate(len(hashes) - len(hit))
    bp.cache_blocks(ids, hashes, len(hit))
    if not keep:
        bp.release(ids)
    return ids


def drive(bp: BlockPool, steps: list[tuple]) -> None:
    """Steps: ("req", hashes) / ("hold", hashes) / ("release", i) / ("evict", n, victims)
    / ("stat", key, value) -- checks policy.stats()[key]."""
    held: list[list[int]] = []
    for k, step in enumerate(steps):
        op = step[0]
        if op == "req":
            run_request(bp, list(step[1]))
        elif op == "hold":
            held.append(run_request(bp, list(step[1]), keep=True))
        elif op == "release":
            bp.release(held[step[1]])
        elif op == "evict":
            assert bp.evict(step[1]) == step[2], f"step {k}: {step}"
        elif op == "stat":
            assert bp.policy.stats()[step[1]] == step[2], f"step {k}: {step}"
        else:  # pragma: no cover
            raise AssertionError(op)
        bp.check_invariants()


def test_s3fifo_victim_order_table():
    """Yang et al. SOSP'23, Algorithm 1: new blocks enter S (or M when their hash is in
    the ghost G); evicting from S moves an accessed block to M (freq cleared) and
    evicts an unaccessed one into G; evicting from M reinserts an accessed block
    with freq - 1. Capacity 4: S is due when it holds >= 1 block; G keeps 3 hashes."""
    bp = BlockPool(4, policy="s3fifo")
    assert (bp.policy.small_capacity, bp.policy.main_capacity) == (1, 3)
    drive(
        bp,
        [
            ("req", "a"),  # block 0 -> S
            ("req", "b"),  # 1
            ("req", "c"),  # 2
            ("req", "d"),  # 3; S = a b c d (oldest first)
            ("req", "b"),  # hit: freq(b) = 1
            ("evict", 1, [0]),  # S tail a, freq 0: evicted, "a" -> G
            ("evict", 1, [2]),  # S tail b accessed -> M (freq 0); next S tail c evicted
            ("stat", "ghost", 2),
            ("req", "a"),  # "a" in G -> block 0 straight into M; M = b a
            ("stat", "main", 2),
            ("evict", 1, [3]),  # S = d still due (1 >= 1): evicted
            ("req", "a"),
            ("req", "a"),  # freq(a) = 2
            ("evict", 1, [1]),  # S empty -> M tail b, freq 0
            ("evict", 1, [0]),  # a reinserted twice (freq 2 -> 1 -> 0), then evicted
            ("stat", "ghost", 2),  # c, d
        ],
    )


def test_s3fifo_in_use_block_keeps_its_place():
    """An in-use block is passed over in place; once released it is the S tail again."""
    bp = BlockPool(4, policy="s3fifo")
    drive(
        bp,
        [
            ("req", "a"),  # 0
            ("req", "b"),  # 1
            ("hold", "a"),  # a in use, freq 1
            ("evict", 1, [1]),  # S tail candidate is b (a is in use)
            ("release", 0),
            ("evict", 1, [0]),  # a (accessed) -> M with freq 0; S empty: M's tail a evicted
        ],
    )


def test_s3fifo_frequency_is_capped_at_3():
    """Two bits: five hits count as three, so a (3) outlives x (2) in M's reinsertions."""
    bp = BlockPool(3, policy="s3fifo")
    drive(
        bp,
        [
            ("req", "a"),  # 0
            ("req", "x"),  # 1
            ("req", "a"),
            ("req", "x"),  # freq 1 each
            ("req", "y"),  # 2; S = a x y
            ("evict", 1, [2]),  # a, x move to M (freq cleared); y evicted
            *[("req", "a")] * 5,  # freq(a) = 3, not 5
            *[("req", "x")] * 2,  # freq(x) = 2
            # M = a(3) x(2): a->2, x->1, a->1, x->0, a->0, then x is the tail with freq 0
            ("evict", 1, [1]),
            ("stat", "main", 1),
        ],
    )


def test_s3fifo_ghost_is_bounded_by_main_capacity():
    bp = BlockPool(4, policy="s3fifo")
    for h in "abcdefgh":
        run_request(bp, [h])
        bp.evict(1)
    assert bp.policy.stats()["ghost"] == 3
    assert list(bp.policy._ghost) == ["f", "g", "h"]


def test_arc_victim_order_table():
    """Megiddo & Modha FAST'03, Fig. 4: a miss enters T1, a hit moves to T2; REPLACE
    evicts T1's LRU when |T1| > p, else T2's; a ghost hit in B1 raises p by
    max(1, |B2|/|B1|), in B2 lowers it by max(1, |B1|/|B2|). c = 4."""
    bp = BlockPool(4, policy="arc")
    drive(
        bp,
        [
            ("req", "a"),
            ("req", "b"),
            ("req", "c"),
            ("req", "d"),  # T1 = a b c d (blocks 0..3)
            ("req", "a"),  # hit: a -> T2
            ("evict", 1, [1]),  # |T1| = 3 > p = 0: T1's LRU b -> B1
            ("evict", 1, [2]),  # c -> B1
            ("req", "b"),  # B1 hit: p = 0 + max(1, 0/2) = 1; b -> T2 (block 1)
            ("stat", "p", 1.0),
            ("evict", 1, [0]),  # |T1| = 1 (d) is not > p = 1: T2's LRU a -> B2
            ("req", "a"),  # B2 hit: p = 1 - max(1, 1/1) = 0; a -> T2 (block 2)
            ("stat", "p", 0.0),
            ("evict", 1, [3]),  # |T1| = 1 > 0: d -> B1
            ("evict", 1, [1]),  # T1 empty: T2's LRU b
            ("stat", "b1", 2),
            ("stat", "b2", 1),
        ],
    )


def test_slru_victim_order_table():
    """Karedla et al. 1994 (SGLang slru): probation first; a hit promotes to protected;
    protected overflow demotes its LRU block to probation's MRU end. Capacity 5,
    protected_ratio 0.4: protected holds 2."""
    bp = BlockPool(5, policy=SLRUPolicy(protected_ratio=0.4))
    drive(
        bp,
        [
            ("req", "a"),
            ("req", "b"),
            ("req", "c"),
            ("req", "d"),  # probation = a b c d (blocks 0..3)
            ("req", "a"),
            ("req", "b"),  # protected = a b
            ("req", "c"),  # protected full: a demoted to probation's MRU; protected = b c
            ("stat", "protected", 2),
            ("evict", 1, [3]),  # probation = d a
            ("evict", 1, [0]),
            ("evict", 1, [1]),  # probation empty: protected's LRU b
            ("evict", 1, [2]),
            ("req", ["p", "pq"]),  # blocks 4, 3; released tail-first: probation = pq p
            ("evict", 1, [3]),
        ],
    )


def test_slru_in_use_overflow_is_demoted_on_release():
    bp = BlockPool(5, policy=SLRUPolicy(protected_ratio=0.2))  # protected holds 1
    drive(
        bp,
        [
            ("req", "a"),
            ("req", "b"),
            ("hold", "a"),  # a protected (in use)
            ("hold", "b"),  # b protected too: 2 > 1 but nothing evictable to demote
            ("stat", "protected", 2),
            ("release", 0),  # a released: the overflow demotes a (protected's LRU candidate)
            ("stat", "protected", 1),
            ("evict", 1, [0]),
        ],
    )


def test_registry_names_and_options():
    assert isinstance(make_policy("s3fifo"), S3FIFOPolicy)
    assert isinstance(make_policy(EvictionPolicyName.ARC), ARCPolicy)
    assert isinstance(make_policy("SLRU", protected_ratio=0.5), SLRUPolicy)
    with pytest.raises(KVConfigError):
        make_policy("slru", protected_ratio=1.5)
    with pytest.raises(KVConfigError):
        make_policy("s3fifo", small_ratio=0.0)


@pytest.mark.parametrize("name", ["s3fifo", "arc", "slru"])
def test_empty_policy_raises_typed_error(name):
    p = make_policy(name)
    p.set_capacity(4)
    with pytest.raises(KVNoVictimError):
        p.pop_victim()
    with pytest.raises(KVNoVictimError):
        p.pop_victims(1)
    assert p.peek_victims(3) == []


@pytest.mark.parametrize("name", ["s3fifo", "arc", "slru"])
@pytest.mark.parametrize("cap", [None, 3])
def test_standalone_prefix_cache_drives_policy(name, cap):
    pc = PrefixCache(block_size=2, max_cached_blocks=cap, eviction_policy=name)
    for i in range(8):
        hs = pc.compute_block_hashes([i % 3, 1, 2, 3])
        pc.lookup(hs)
        pc.insert(hs, [{"b": i}, {"b": i + 100}])
    n = len(pc)
    if cap is not None:
        assert n <= cap
    assert pc.evict_by_count(100) == n
    assert len(pc) == 0


# -- reference implementations (lists, linear scans) -------------------------


class _Ref(EvictionPolicy):
    tracks_hits = True

    def add(self, b):
        self.ev.add(b)
        self._moved(b)

    def _moved(self, b):
        pass

    def remove(self, b):
        self.ev.remove(b)

    def __len__(self):
        return len(self.ev)

    def __contains__(self, b):
        return b in self.ev

    def pop_victims(self, n):
        if n > len(self.ev):
            raise self._no_victim()
        return [self.pop_victim() for _ in range(n)]

    def peek_victims(self, n):
        c = copy.deepcopy(self, {id(self.clock): self.clock})
        return [c.pop_victim() for _ in range(min(n, len(c.ev)))]

    def reset(self):  # pragma: no cover
        raise NotImplementedError


def _first_evictable(lst, ev):
    for x in lst:
        if x in ev:
            return x
    return None


class RefS3FIFO(_Ref):
    name = "ref-s3fifo"

    def __init__(self, clock=None, small_ratio=0.1):
        super().__init__(clock)
        self.small_ratio = small_ratio
        self.S, self.M, self.G = [], [], []  # oldest first
        self.freq, self.ev, self.to_ghost = {}, set(), set()

    def on_cached(self, b, h, parent):
        if h in self.G:
            self.G.remove(h)
            self.M.append(b)
        else:
            self.S.append(b)
        self.freq[b] = 0

    def on_hit(self, b):
        if b in self.freq:
            self.freq[b] = min(3, self.freq[b] + 1)

    def pop_victim(self):
        small_cap = max(1, int(self.small_ratio * self.capacity))
        while True:
            ts = _first_evictable(self.S, self.ev)
            tm = _first_evictable(self.M, self.ev)
            if ts is not None and (len(self.S) >= small_cap or tm is None):
                self.S.remove(ts)
                if self.freq[ts] > 0:
                    self.freq[ts] = 0
                    self.M.append(ts)
                    continue
                self.to_ghost.add(ts)
                t = ts
            else:
                self.M.remove(tm)
                if self.freq[tm] > 0:
                    self.freq[tm] -= 1
                    self.M.append(tm)
                    continue
                t = tm
            self.ev.remove(t)
            del self.freq[t]
            return t

    def on_evicted(self, b, h):
        if b in self.to_ghost:
            self.to_ghost.remove(b)
            self.G.append(h)
            main_cap = max(1, self.capacity - max(1, int(self.small_ratio * self.capacity)))
            self.G = self.G[-main_cap:]

    def on_removed(self, b, h):
        for lst in (self.S, self.M):
            if b in lst:
                lst.remove(b)
        self.freq.pop(b, None)
        self.ev.discard(b)


class RefARC(_Ref):
    name = "ref-arc"

    def __init__(self, clock=None):
        super().__init__(clock)
        self.T1, self.T2, self.B1, self.B2 = [], [], [], []  # LRU first
        self.p, self.ev, self.hash = 0.0, set(), {}

    def _moved(self, b):  # released: MRU end of its list
        lst = self.T1 if b in self.T1 else self.T2
        lst.remove(b)
        lst.append(b)

    def on_cached(self, b, h, parent):
        self.hash[b] = h
        c = self.capacity
        if h in self.B1:
            self.p = min(c, self.p + max(1.0, len(self.B2) / len(self.B1)))
            self.B1.remove(h)
            self.T2.append(b)
        elif h in self.B2:
            self.p = max(0.0, self.p - max(1.0, len(self.B1) / len(self.B2)))
            self.B2.remove(h)
            self.T2.append(b)
        else:
            total = len(self.T1) + len(self.T2) + len(self.B1) + len(self.B2)
            if len(self.T1) + len(self.B1) >= c:
                if self.B1:
                    self.B1.pop(0)
            elif total >= 2 * c and self.B2:
                self.B2.pop(0)
            self.T1.append(b)

    def on_hit(self, b):
        if b in self.T1:
            self.T1.remove(b)
            self.T2.append(b)
        elif b in self.T2 and b in self.ev:
            self.T2.remove(b)
            self.T2.append(b)

    def pop_victim(self):
        c1 = _first_evictable(self.T1, self.ev)
        c2 = _first_evictable(self.T2, self.ev)
        if c1 is not None and (len(self.T1) > self.p or c2 is None):
            self.T1.remove(c1)
            self.B1.append(self.hash.pop(c1))
            t = c1
        else:
            self.T2.remove(c2)
            self.B2.append(self.hash.pop(c2))
            t = c2
        self.ev.remove(t)
        c = self.capacity
        while len(self.T1) + len(self.B1) > c:
            self.B1.pop(0)
        while self.B2 and len(self.T1) + len(self.T2) + len(self.B1) + len(self.B2) > 2 * c:
            self.B2.pop(0)
        return t

    def on_removed(self, b, h):
        for lst in (self.T1, self.T2):
            if b in lst:
                lst.remove(b)
        self.ev.discard(b)


class RefSLRU(_Ref):
    name = "ref-slru"

    def __init__(self, clock=None, protected_ratio=0.8):
        super().__init__(clock)
        self.ratio = protected_ratio
        self.prob, self.prot, self.ev = [], [], set()  # LRU first

    def _demote(self):
        cap = int(self.ratio * self.capacity)
        while len(self.prot) > cap:
            x = _first_evictable(self.prot, self.ev)
            if x is None:
                return
            self.prot.remove(x)
            self.prob.append(x)

    def _moved(self, b):
        lst = self.prot if b in self.prot else self.prob
        lst.remove(b)
        lst.append(b)
        if lst is self.prot:
            self._demote()

    def on_cached(self, b, h, parent):
        self.prob.append(b)

    def on_hit(self, b):
        if b in self.prob:
            self.prob.remove(b)
            self.prot.append(b)
            self._demote()
        elif b in self.prot and b in self.ev:
            self.prot.remove(b)
            self.prot.append(b)

    def pop_victim(self):
        t = _first_evictable(self.prob, self.ev)
        lst = self.prob
        if t is None:
            t, lst = _first_evictable(self.prot, self.ev), self.prot
        lst.remove(t)
        self.ev.remove(t)
        return t

    def on_removed(self, b, h):
        for lst in (self.prob, self.prot):
            if b in lst:
                lst.remove(b)
        self.ev.discard(b)


# -- differential tests --------------------------------------------------------

paths = st.lists(st.integers(0, 1), min_size=1, max_size=3).map(tuple)
request = st.tuples(st.just("req"), paths, st.booleans())
ops = st.lists(
    st.one_of(
        request,
        request,
        request,
        st.tuples(st.just("release"), st.integers(0, 5)),
        st.tuples(st.just("evict"), st.integers(1, 3)),
        st.tuples(st.just("uncache"), st.integers(0, 50)),
        st.tuples(st.just("pin"), st.integers(0, 50)),
        st.tuples(st.just("unpin"), st.integers(0, 5)),
    ),
    min_size=30,
    max_size=100,
)


def _apply(bp: BlockPool, op: tuple, held: list, pinned: list):
    """One random event on ``bp``; returns what the caller can compare."""
    kind = op[0]
    if kind == "req":
        hs = [op[1][: i + 1] for i in range(len(op[1]))]
        hit = bp.match_prefix(hs)
        if len(hs) - len(hit) > bp.num_available - bp.num_evictable_among(hit):
            return "full"
        before = bp.num_evictions
        ids = run_request(bp, hs, keep=op[2])
        if op[2]:
            held.append(ids)
        return ids, bp.num_evictions - before
    if kind == "release" and held:
        bp.release(held.pop(op[1] % len(held)))
    elif kind == "evict":
        return bp.evict(op[1])
    elif kind == "uncache" and bp.cached:
        return bp.uncache(sorted(bp.cached.values())[op[1] % len(bp.cached)])
    elif kind == "pin" and bp.cached:
        b = sorted(bp.cached.values())[op[1] % len(bp.cached)]
        bp.pin([b])
        pinned.append(b)
    elif kind == "unpin" and pinned:
        bp.unpin([pinned.pop(op[1] % len(pinned))])
    return None


def _run_differential(make_real, make_ref, capacity, events):
    real = BlockPool(capacity, policy=make_real())
    ref = BlockPool(capacity, policy=make_ref())
    state = {id(real): ([], []), id(ref): ([], [])}
    for op in events:
        got = _apply(real, op, *state[id(real)])
        want = _apply(ref, op, *state[id(ref)])
        assert got == want, op
        assert real.block_hashes == ref.block_hashes, op
        assert len(real.policy) == len(ref.policy)
        assert real.policy.peek_victims(capacity) == ref.policy.peek_victims(capacity), op
        real.check_invariants()


_SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(st.integers(2, 14), st.sampled_from([0.1, 0.3]), ops)
def test_s3fifo_matches_reference(capacity, ratio, events):
    """Same victims, step by step, as the list-based S3-FIFO above (SOSP'23 Algorithm 1)."""
    _run_differential(
        lambda: S3FIFOPolicy(small_ratio=ratio),
        lambda: RefS3FIFO(small_ratio=ratio),
        capacity,
        events,
    )


@_SETTINGS
@given(st.integers(2, 14), ops)
def test_arc_matches_reference(capacity, events):
    """Same victims, step by step, as the list-based ARC above (FAST'03 Fig. 4)."""
    _run_differential(ARCPolicy, RefARC, capacity, events)


@_SETTINGS
@given(st.integers(2, 14), st.sampled_from([0.5, 0.8]), ops)
def test_slru_matches_reference(capacity, ratio, events):
    """Same victims, step by step, as the list-based SLRU above."""
    _run_differential(
        lambda: SLRUPolicy(protected_ratio=ratio),
        lambda: RefSLRU(protected_ratio=ratio),
        capacity,
        events,
    )
