"""``BlockPool.check_invariants``: the pool's structural invariants, asserted.

O(num_blocks): for tests, the stateful machines and debug mode, never the hot
path. Kept beside ``block_pool.py`` (part of ``BlockPool``, apart for size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .block_pool import BlockPool

__all__ = ["check_invariants"]


def check_invariants(pool: BlockPool) -> None:
    """Assert the structural invariants (O(num_blocks); for tests and debug mode)."""
    free = set(pool.free_queue)
    assert len(free) == len(pool.free_queue), "a block is twice in the free queue"
    evictable = {b for b in range(pool.num_blocks) if b in pool.policy}
    assert len(evictable) == len(pool.policy), "policy holds unknown block ids"
    assert not free & evictable, f"blocks both free and evictable: {free & evictable}"
    for b in range(pool.num_blocks):
        r, p, h = pool.ref_counts[b], pool.pin_counts[b], pool.block_hashes[b]
        assert r >= 0 and p >= 0, f"block {b}: negative count ref={r} pin={p}"
        if b in free:
            assert r == 0 and p == 0 and h is None, f"free block {b} has ref={r} pin={p} hash={h!r}"
        elif b in evictable:
            assert r == 0 and p == 0 and h is not None, f"evictable block {b}: ref={r} pin={p}"
        else:
            assert r > 0 or p > 0, f"block {b} is in no state (ref 0, not free, not evictable)"
        if h is not None:
            assert pool.cached.get(h) == b, f"block {b} hash not mapped back to it"
    assert len(pool.cached) == sum(h is not None for h in pool.block_hashes)
