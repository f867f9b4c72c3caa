"""The whole stack under every eviction policy, with disk faults (issue 11, system test).

A ``RuleBasedStateMachine`` drives a ``KVOffloadManager`` like an engine: a
real-KV device ``KVPool`` (``TINY`` model shape) under one registered eviction
policy (every one, plain and ``leaf:``, ``ttl`` and ``priority`` included) over
a host-memory tier and a disk tier, while faults are injected through the
documented seam (``offload/faults.py``): a corrupted file, a file deleted
behind the store's back, a full disk, a failed read. Prompts are strings over
three distinct blocks, so requests share prefixes; the KV of every full block
is a function of its hash (of the whole chain), so "what was written under
this hash" is known whatever request wrote it.

After every step: the device pool's invariants (block-state partition, refs
== live handles, pins, hash map, budget), every tier's invariants, the disk
index equal to its files (except files deleted behind the store's back that
nothing has read yet), exactly the live handles' blocks in use (so none leak
once all are freed), and every cached block on the device and in host memory
holding the KV of its hash. At allocation, every hit, whatever tier it came
from, reads back as what was written under its hash.

Scale: ``SAGELLM_STATEFUL_STEPS`` steps per policy (default 240: the CI
profile runs the file in well under 25 s). Each test prints the steps it
checked and the hits per source tier (``-s``). Long profile (at least 100k
steps per policy, 3-5 minutes per policy; ``--timeout=0`` lifts the suite's
per-test limit)::

    SAGELLM_STATEFUL_STEPS=100000 python -m pytest -q -s -p no:cacheprovider \\
        --timeout=0 tests/test_system_stateful.py -k machine
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from conftest import TINY
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from test_hardening_pool import ALL_POLICIES, Clock, assert_same, kv_for, snapshot

from sagellm_kv_cache import errors as E
from sagellm_kv_cache.offload import KVOffloadManager, TierConfig
from sagellm_kv_cache.offload.faults import FaultyDiskIO
from sagellm_kv_cache.pool import KVPool
from tests._machines import run_policy_machine
from tests._offload_faults import FAULTS, check_tiers_and_files, inject_fault

BS = 4
NUM_BLOCKS = 6  # device; the cpu tier holds 3, the disk tier 4: blocks move all the time
ALPHABET = [[1] * BS, [2] * BS, [3] * BS]
STEPS = int(os.environ.get("SAGELLM_STATEFUL_STEPS", "240"))
STEPS_PER_EXAMPLE = 40
STEP_COUNTS: dict[str, int] = {}  # policy -> steps checked
HITS: dict[str, dict[str, int]] = {}  # policy -> source tier -> verified hit blocks
_READ_ERRORS = {"KV_CHECKSUM_MISMATCH", "KV_STORAGE_ERROR"}
_KV_OF: dict = {}


def kv_of(block_hash: bytes) -> torch.Tensor:
    """The KV written under ``block_hash`` (any request, any time): a function of the hash."""
    kv = _KV_OF.get(block_hash)
    if kv is None:
        kv = _KV_OF[block_hash] = kv_for(BS, int.from_bytes(block_hash[:7], "little"))
    return kv


#: prompts as strings of blocks: a few shared roots, so prefixes are shared and hit
PROMPTS = st.one_of(
    st.sampled_from([[0], [0, 1], [0, 1, 2], [0, 1, 0, 2], [1], [1, 2], [2, 2, 1], [0, 2]]),
    st.lists(st.integers(0, 2), min_size=1, max_size=4),
)


def tokens_of(blocks: list[int], tail: int) -> list[int]:
    return [t for i in blocks for t in ALPHABET[i]] + [7] * tail


class SystemMachine(RuleBasedStateMachine):
    policy = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.m: KVOffloadManager | None = None
        self.live: dict[str, list] = {}  # handle_id -> [alloc, tokens]
        self.deleted: set = set()  # disk files removed behind the store's back, not yet noticed
        self.inner = self.policy.removeprefix("leaf:")
        self.seed = 0
        self.hits = HITS.setdefault(self.policy, {})

    @initialize(
        async_copies=st.booleans(),
        promote_on_hit=st.booleans(),
        write_policy=st.sampled_from(["write_back", "write_through"]),
    )
    def setup(self, async_copies, promote_on_hit, write_policy):
        self.dir = tempfile.mkdtemp(prefix="kv-system-")
        self.clock = Clock()
        self.pool = KVPool(
            num_blocks=NUM_BLOCKS,
            block_size=BS,
            model_shape=TINY,
            eviction_policy=self.policy,
            clock=self.clock,
        )
        tiers = [
            TierConfig("cpu", 3),
            TierConfig("disk", 4, "disk", directory=self.dir, fsync=False),
        ]
        self.m = KVOffloadManager(
            self.pool,
            tiers,
            device_tier_name="gpu",
            async_copies=async_copies,
            promote_on_hit=promote_on_hit,
            write_policy=write_policy,
        )
        self.io = FaultyDiskIO()
        self.store = self.m.tiers[-1].disk
        self.store.io = self.io

    def teardown(self) -> None:
        if self.m is not None:
            self.m.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _pick(self, data) -> list:
        return self.live[data.draw(st.sampled_from(sorted(self.live)))]

    def _refused(self, call, errors) -> None:
        self.m.wait_all(10)
        self.m.where(b"")  # settle finished jobs first: the snapshot is then stable
        before = snapshot(self.pool)
        with pytest.raises(errors):
            call()
        assert_same(snapshot(self.pool), before)

    # -- engine traffic ------------------------------------------------------
    @precondition(lambda self: self.m is not None)
    @rule(prompt=PROMPTS, tail=st.integers(0, BS - 1))
    def request(self, prompt, tail):
        """A whole request: allocate, compute the misses, cache, free."""
        h = self._allocate(tokens_of(prompt, tail))
        if h is not None:
            self.m.cache_blocks(h)
            if not h.pin_count:
                self.m.free(h)
                del self.live[h.handle_id]

    @precondition(lambda self: self.m is not None and len(self.live) < 3)
    @rule(prompt=PROMPTS, tail=st.integers(0, BS - 1))
    def start_request(self, prompt, tail):
        """A request that stays running (cached, freed, pinned by later steps)."""
        self._allocate(tokens_of(prompt, tail))

    def _allocate(self, tokens: list[int]):
        """Allocate with the prefix from every tier, check each hit, compute the rest."""
        if not tokens:
            return None
        m = self.m
        m.wait_all(10)
        m.where(b"")
        before = snapshot(self.pool)
        try:
            alloc = m.allocate(tokens)
        except (E.KVBudgetExceededError, E.KVNoVictimError):
            assert_same(snapshot(self.pool), before)
            return None
        result = alloc.wait(10)
        h = alloc.handle
        hit = h.num_cached_tokens
        look = alloc.lookup
        assert hit % BS == 0 and look.num_device_hit_blocks * BS <= hit <= look.num_hit_tokens
        for e in result.errors:
            assert isinstance(e, E.KVCacheError) and e.code in _READ_ERRORS, repr(e)
        if not result.errors:
            assert hit == look.num_hit_tokens
        hashes = h.block_hashes
        for p in range(hit // BS):  # every hit, from whichever tier, is what was written
            got = self.pool.read_kv(h, BS, p * BS)
            assert torch.equal(got, kv_of(hashes[p])), (p, look.tiers[p])
            self.hits[look.tiers[p]] = self.hits.get(look.tiers[p], 0) + 1
        n = len(tokens)
        if hit < n:  # compute the misses: full blocks from their hash, the tail anyhow
            parts = [kv_of(hashes[p]) for p in range(hit // BS, n // BS)]
            if n % BS:
                self.seed += 1
                parts.append(kv_for(n % BS, self.seed))
            self.pool.write_kv(h, torch.cat(parts, dim=2), start_token=hit)
        if hit:  # the hit range is read-only
            self._refused(
                lambda: self.pool.write_kv(h, kv_of(hashes[0]), start_token=0),
                E.KVBlockImmutableError,
            )
        self.live[h.handle_id] = [alloc, tokens]
        return h

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.sampled_from([None, BS, 2 * BS]))
    def cache(self, data, chunk):
        alloc, tokens = self._pick(data)
        if chunk is not None and chunk > len(tokens):
            chunk = None
        self.m.cache_blocks(alloc.handle, num_tokens=chunk)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        alloc, _ = self._pick(data)
        h = alloc.handle
        if h.pin_count:
            self._refused(lambda: self.m.free(h), E.KVHandlePinnedError)
            return
        self.m.free(h)
        del self.live[h.handle_id]

    @precondition(lambda self: self.live)
    @rule(data=st.data(), pin=st.booleans())
    def pin(self, data, pin):
        h = self._pick(data)[0].handle
        if pin:
            self.pool.pin(h)
        elif h.pin_count:
            self.pool.unpin(h)

    @precondition(lambda self: self.live and self.inner in ("ttl", "priority"))
    @rule(data=st.data(), value=st.integers(1, 90))
    def retention(self, data, value):
        h = self._pick(data)[0].handle
        if all(self.pool.block_pool.block_hashes[b] is None for b in h.block_ids):
            return  # nothing cached to protect (the pool refuses it: test_hardening_pool)
        if self.inner == "ttl":
            self.pool.pin_prefix(h, float(value))
        else:
            self.pool.set_retention(h, value, duration_s=float(value) if value % 2 else None)

    @precondition(lambda self: self.m is not None)
    @rule(dt=st.sampled_from([1.0, 10.0, 100.0]))
    def tick(self, dt):
        self.clock.t += dt

    @precondition(lambda self: self.m is not None)
    @rule(n=st.integers(1, 3))
    def evict(self, n):
        self.m.evict(n).result(10)

    @precondition(lambda self: self.m is not None and self.pool.block_pool.cached)
    @rule(data=st.data())
    def invalidate(self, data):
        hashes = sorted(self.pool.block_pool.cached, key=repr)
        k = data.draw(st.integers(1, len(hashes)))
        self.m.invalidate(hashes[:k])

    # -- faults --------------------------------------------------------------
    @precondition(lambda self: self.m is not None)
    @rule(fault=FAULTS, data=st.data())
    def inject(self, fault, data):
        inject_fault(self, fault, data)

    # -- after every step ----------------------------------------------------
    @invariant()
    def consistent(self):
        m = self.m
        if m is None:
            return
        STEP_COUNTS[self.policy] = STEP_COUNTS.get(self.policy, 0) + 1
        check_tiers_and_files(self)
        bp = self.pool.block_pool
        handles = [a.handle for a, _ in self.live.values()]
        pins = [0] * NUM_BLOCKS
        for h in handles:
            for b in h.block_ids:
                pins[b] += h.pin_count
        assert pins == bp.pin_counts
        stats = self.pool.get_stats()  # no leak: exactly the live handles' blocks are in use
        assert stats["used_blocks"] == len({b for h in handles for b in h.block_ids})
        assert stats["num_handles"] == len(self.live)
        storage = self.pool.storage
        for hh, b in bp.cached.items():  # every device block holds the KV of its hash
            got = storage._to_tokens(storage.read_blocks([b])).view(torch.float16)
            assert torch.equal(got, kv_of(hh)), ("gpu", b)
        for hh in m.tiers[0].pool.cached:  # and so does every host-memory copy
            tier, data = m.read_block(hh)
            if tier == "cpu":
                assert torch.equal(data.reshape(kv_of(hh).shape), kv_of(hh)), ("cpu", hh)
        for alloc, tokens in self.live.values():  # handles read back what they hold
            h = alloc.handle
            full = len(tokens) // BS
            if full:
                want = torch.cat([kv_of(x) for x in h.block_hashes[:full]], dim=2)
                assert torch.equal(self.pool.read_kv(h, full * BS, 0), want)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_system_machine(policy):
    run_policy_machine(
        SystemMachine,
        policy,
        prefix="System",
        steps=STEPS,
        steps_per_example=STEPS_PER_EXAMPLE,
        slack=(5, 4),  # hypothesis ends some runs early: 25% more runs reach STEPS steps
    )
    print(f"system {policy}: {STEP_COUNTS.get(policy, 0)} steps checked, hits {HITS[policy]}")


# -- what the machine found -------------------------------------------------------------
def test_a_tier_insert_with_resident_blocks_fits_the_new_ones_in_the_other_slots():
    """Found by the machine (leaf:slru device, write-through): a spill of 4 blocks into a
    3-slot tier holding 2 of them raised a raw KV_POOL_FULL out of ``allocate``: the
    resident blocks are held while the new ones are placed, the overflow counted only
    new blocks against the whole tier."""
    from sagellm_kv_cache.offload.tiers import LowerTier

    tier = LowerTier(TierConfig("cpu", 3), BS)
    assert tier.insert(["a", "b"], None, []) == ([], None)
    victims, _ = tier.insert(["a", "b", "c", "d"], None, [])
    assert victims == ["c"]  # the oldest new block falls through
    assert sorted(tier.pool.cached) == ["a", "b", "d"]
    tier.check_invariants()
    victims, _ = tier.insert(["a", "a", "e"], None, [])  # a repeated resident hash
    assert victims == ["b"] and sorted(tier.pool.cached) == ["a", "d", "e"]
    tier.check_invariants()


def replay(tmp_path, policy: str, requests: list, **kwargs) -> KVOffloadManager:
    """Whole requests (prompt blocks, tail) on a synchronous manager shaped like the
    machine's, checking the invariants after each; the manager, still open."""
    pool = KVPool(num_blocks=NUM_BLOCKS, block_size=BS, model_shape=TINY, eviction_policy=policy)
    tiers = [
        TierConfig("cpu", 3),
        TierConfig("disk", 4, "disk", directory=str(tmp_path), fsync=False),
    ]
    m = KVOffloadManager(pool, tiers, device_tier_name="gpu", async_copies=False, **kwargs)
    try:
        for prompt, tail in requests:
            tokens = tokens_of(prompt, tail)
            alloc = m.allocate(tokens)
            alloc.wait(10)
            h = alloc.handle
            hit, n = h.num_cached_tokens, len(tokens)
            for p in range(hit // BS):
                assert torch.equal(pool.read_kv(h, BS, p * BS), kv_of(h.block_hashes[p]))
            if hit < n:
                parts = [kv_of(x) for x in h.block_hashes[hit // BS : n // BS]]
                parts += [kv_for(n % BS, 0)] if n % BS else []
                pool.write_kv(h, torch.cat(parts, dim=2), start_token=hit)
            m.cache_blocks(h)
            m.free(h)
            m.check_invariants()
    except BaseException:
        m.close()
        raise
    return m


def test_the_machine_sequence_that_overfilled_a_tier(tmp_path):
    seq = [([0], 0)] * 4 + [([0, 1, 2], 0), ([2, 2, 1], 0), ([0, 0, 0, 0], 1)]
    m = replay(tmp_path, "leaf:slru", seq, promote_on_hit=False, write_policy="write_through")
    m.close()


def test_an_exclusive_chain_does_not_keep_below_a_victim_onboarded_right_back(tmp_path):
    """Found by the machine (fifo device, exclusive write-back): the last request hits
    ``1`` in the cpu tier and ``11`` on the device, but allocating it evicts ``11``,
    which is onboarded from the staged victim bytes *and* was spilled to the cpu tier:
    the exclusive chain held it twice."""
    seq = [([0], 0), ([1, 1, 0, 0], 0), ([0], 0), ([0, 1], 0), ([0], 1), ([1, 1, 0], 0)]
    m = replay(tmp_path, "fifo", seq, promote_on_hit=True, write_policy="write_back")
    try:
        h11 = m.device.compute_block_hashes(tokens_of([1, 1], 0))[1]
        assert m.where(h11) == ["gpu"]
    finally:
        m.close()


# -- KVPool.register_blocks: the public path for KV copied in from elsewhere ------------
def test_register_blocks_makes_written_blocks_hits_from_start_block_on():
    pool = KVPool(num_blocks=8, block_size=BS, model_shape=TINY)
    tokens = tokens_of([0, 1, 2], 1)
    h, hit = pool.alloc_with_prefix(tokens)
    assert hit == 0 and len(h.block_hashes) == 3
    want = torch.cat([kv_of(x) for x in h.block_hashes] + [kv_for(1, 1)], dim=2)
    pool.write_kv(h, want)  # as if copied in from a lower tier and verified
    bp = pool.block_pool
    assert pool.register_blocks(h, h.block_hashes[:2]) == 2
    assert h.state.value == "cached"
    assert pool.match_prefix(tokens) == (h.block_ids[:2], 2 * BS)
    assert pool.register_blocks(h, h.block_hashes[:2]) == 0  # already registered
    assert pool.register_blocks(h, h.block_hashes, 2) == 1  # the rest, parented on block 1
    b0, b1, b2 = h.block_ids[:3]
    assert bp.cached == dict(zip(h.block_hashes, (b0, b1, b2), strict=True))
    assert bp.parent_ids[b0] == -1 and bp.parent_ids[b1] == b0 and bp.parent_ids[b2] == b1
    g, hit = pool.alloc_with_prefix(tokens)
    assert hit == 3 * BS and g.block_ids[:3] == [b0, b1, b2]
    assert torch.equal(pool.read_kv(g, 3 * BS), want[:, :, : 3 * BS])
    pool.check_invariants()


def test_register_blocks_refuses_before_registering_anything():
    pool = KVPool(num_blocks=8, block_size=BS, model_shape=TINY)
    h = pool.alloc(2 * BS)  # no hashes of its own: register_blocks gives them
    before = snapshot(pool)
    with pytest.raises(E.KVInvalidInputError) as info:
        pool.register_blocks(h, [b"a", None])
    assert info.value.code == "KV_INVALID_INPUT"
    with pytest.raises(E.KVInvalidTypeError) as info:
        pool.register_blocks(h, [b"a", b"b"], 1.0)
    assert info.value.code == "KV_INVALID_TYPE"
    assert_same(snapshot(pool), before)
    assert h.block_hashes == []
    assert pool.register_blocks(h, [b"a", b"b"], 1) == 1  # block 0 stays unregistered
    assert pool.block_pool.cached == {b"b": h.block_ids[1]} and h.block_hashes == [b"a", b"b"]
    before = snapshot(pool)
    with pytest.raises(E.KVInvalidInputError, match="differ"):
        pool.register_blocks(h, [b"x", b"b"])
    assert_same(snapshot(pool), before)
    pool.free(h)
    with pytest.raises(E.KVDoubleFreeError):
        pool.register_blocks(h, [b"a"])
    pool.check_invariants()
