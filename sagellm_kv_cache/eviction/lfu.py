"""Least frequently used, ties to the least recently released.

Definition (SGLang ``LFUStrategy``: priority = ``(hit_count, last_access_time)``,
smallest first; the classic LFU with LRU tie-breaking): a block's frequency
counts its accesses while it holds its current hash, the insertion
(``on_cached``) counting as 1 and every lookup hit (``on_hit``) adding 1.
Among the evictable blocks, the one with the smallest frequency goes first;
equal frequencies go in LRU order, recency being the pool's release order
(as ``LRUPolicy``: a request's blocks are released tail-first, so among
equals its suffix goes before its prefix).

The frequency belongs to the cached content: it is forgotten when the
block's hash is evicted or dropped (``on_evicted`` / ``on_removed``), so a
block cached again under a new hash starts at 1. A hit on a block the
policy has not seen cached is ignored.

Backed by a lazy-deletion heap keyed by ``(frequency, release number)``
(``_lazyheap.py``): add, remove, pop and a hit on an evictable block are
O(log n) amortized; a hit on a block in use is O(1).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from ._lazyheap import LazyHeap
from .base import EvictionPolicy

__all__ = ["LFUPolicy"]


class LFUPolicy(EvictionPolicy):
    name = "lfu"
    description = "fewest accesses (insert + hits) first, ties least recently released (SGLang lfu)"
    tracks_hits = True

    def __init__(self, clock=None) -> None:
        super().__init__(clock)
        self._heap = LazyHeap()
        self._freq: dict[int, int] = {}  # cached block -> access count
        self._rel: dict[int, int] = {}  # evictable block -> release number
        self._next = 0

    def frequency(self, block_id: int) -> int:
        """Accesses counted for ``block_id``'s current hash (0 when not cached)."""
        return self._freq.get(block_id, 0)

    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        self._freq[block_id] = 1

    def on_hit(self, block_id: int) -> None:
        f = self._freq.get(block_id)
        if f is None:
            return
        self._freq[block_id] = f + 1
        r = self._rel.get(block_id)
        if r is not None:  # a hit on an evictable block (standalone caches): re-key it
            self._heap.push(block_id, f + 1, r)

    def add(self, block_id: int) -> None:
        self._next = r = self._next + 1
        self._rel[block_id] = r
        f = self._freq.get(block_id)
        if f is None:
            f = self._freq[block_id] = 1
        self._heap.push(block_id, f, r)

    def add_many(self, block_ids: Iterable[int]) -> None:
        rel = self._rel
        freq = self._freq
        push = self._heap.push
        r = self._next
        for b in block_ids:
            r += 1
            rel[b] = r
            f = freq.get(b)
            if f is None:
                f = freq[b] = 1
            push(b, f, r)
        self._next = r

    def remove(self, block_id: int) -> None:
        del self._rel[block_id]
        self._heap.discard(block_id)

    def remove_many(self, block_ids: Iterable[int]) -> None:
        rel = self._rel
        ids = list(block_ids)
        for b in ids:
            del rel[b]
        self._heap.discard_many(ids)

    def pop_victim(self) -> int:
        if not self._rel:
            raise self._no_victim()
        b = self._heap.pop()
        del self._rel[b]
        return b

    def pop_victims(self, n: int) -> list[int]:
        if n > len(self._rel):
            raise self._no_victim()
        rel = self._rel
        out = self._heap.pop_many(n)
        for b in out:
            del rel[b]
        return out

    def peek_victims(self, n: int) -> list[int]:
        return self._heap.peek(n)

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        self._freq.pop(block_id, None)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._freq.pop(block_id, None)

    def __len__(self) -> int:
        return len(self._rel)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._rel

    def reset(self) -> None:
        self._heap.clear()
        self._freq.clear()
        self._rel.clear()
