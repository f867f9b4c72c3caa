"""Random alloc/free/pin/unpin/lookup/insert/evict sequences keep every invariant."""

from __future__ import annotations

import torch
from conftest import TINY
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sagellm_kv_cache import errors as E
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.prefix_cache import PrefixCache

BLOCK = 4
NUM_BLOCKS = 10
# prompts drawn from a small tree so that prefixes really are shared
BASES = [[1] * 8, [2] * 8]


def prompt_from(base: int, branch: int, length: int) -> list[int]:
    return (BASES[base] + [100 + branch] * 8 + [200 + branch] * 8)[:length]


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = KVPool(num_blocks=NUM_BLOCKS, block_size=BLOCK, model_shape=TINY)
        self.cache = PrefixCache(pool=self.pool)
        self.live: dict[str, tuple] = {}  # handle_id -> (handle, kv written)
        self.counter = 0

    def _kv(self, n: int) -> torch.Tensor:
        self.counter += 1
        g = torch.Generator().manual_seed(self.counter)
        return torch.randn(2, 2, n, 2, 4, generator=g).to(torch.float16)

    def _remember(self, h, hit: int = 0) -> None:
        kv = self._kv(h.num_tokens)
        if hit:  # leading hit blocks already hold the cached KV: keep it, write the rest
            kv[:, :, :hit] = self.pool.read_kv(h, num_tokens=hit)
            if hit < h.num_tokens:
                self.pool.write_kv(h, kv[:, :, hit:], start_token=hit)
        else:
            self.pool.write_kv(h, kv)
        self.live[h.handle_id] = (h, kv)

    @rule(n=st.integers(-2, 48))
    def alloc(self, n):
        before = self.pool.get_stats()
        try:
            h = self.pool.alloc(n)
        except (E.KVInvalidInputError, E.KVBudgetExceededError):
            assert self.pool.get_stats() == before
            return
        self._remember(h)

    @rule(base=st.integers(0, 1), branch=st.integers(0, 2), length=st.integers(1, 24))
    def alloc_prefix(self, base, branch, length):
        before = self.pool.get_stats()
        try:
            h, hit = self.pool.alloc_with_prefix(prompt_from(base, branch, length))
        except E.KVBudgetExceededError:
            assert self.pool.get_stats() == before
            return
        self._remember(h, hit)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def cache_handle(self, data):
        hid = data.draw(st.sampled_from(list(self.live)))
        h, _ = self.live[hid]
        if h.block_hashes:
            self.pool.cache_blocks(h)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        hid = data.draw(st.sampled_from(list(self.live)))
        h, _ = self.live[hid]
        if h.pin_count:
            try:
                self.pool.free(h)
            except E.KVHandlePinnedError:
                return
            raise AssertionError("freeing a pinned handle must fail")
        self.pool.free(h)
        del self.live[hid]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def pin(self, data):
        h, _ = self.live[data.draw(st.sampled_from(list(self.live)))]
        self.pool.pin(h)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def unpin(self, data):
        h, _ = self.live[data.draw(st.sampled_from(list(self.live)))]
        if h.pin_count:
            self.pool.unpin(h)
        else:
            try:
                self.pool.unpin(h)
            except E.KVRefCountUnderflowError:
                return
            raise AssertionError("unpinning an unpinned handle must fail")

    @rule(base=st.integers(0, 1), branch=st.integers(0, 2), length=st.integers(1, 24))
    def lookup(self, base, branch, length):
        hashes = self.pool.compute_block_hashes(prompt_from(base, branch, length))
        blocks, n = self.cache.lookup(hashes)
        assert n == len(blocks) * BLOCK
        for h, b in zip(hashes, blocks):
            assert self.pool.block_pool.block_hashes[b] == h

    @precondition(lambda self: self.live)
    @rule(data=st.data(), salt=st.integers(0, 3))
    def insert(self, data, salt):
        h, _ = self.live[data.draw(st.sampled_from(list(self.live)))]
        full = h.num_tokens // BLOCK
        hashes = [("ext", salt, h.handle_id, i) for i in range(full)]
        self.cache.insert(hashes, h.block_ids[:full])

    @rule(n=st.integers(1, 12))
    def evict(self, n):
        evictable = self.pool.block_pool.num_evictable
        out = self.pool.evict(n)
        assert len(out) == min(n, evictable)

    @invariant()
    def invariants(self):
        pool = self.pool
        bp = pool.block_pool
        bp.check_invariants()
        pool.check_invariants()  # refs == live handles' references
        free = set(bp.free_queue)
        used = {b for b in range(NUM_BLOCKS) if bp.ref_counts[b] or bp.pin_counts[b]}
        assert len(free) + len(used) + bp.num_evictable == NUM_BLOCKS
        assert not free & used
        assert len(used) <= NUM_BLOCKS and all(r >= 0 for r in bp.ref_counts)
        # a block referenced by a live handle is never evicted or overwritten
        for h, kv in self.live.values():
            assert torch.equal(pool.read_kv(h), kv)
            for b in h.block_ids:
                if bp.block_hashes[b] is not None:
                    assert bp.cached[bp.block_hashes[b]] == b


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
