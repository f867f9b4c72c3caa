"""First in, first out: evict in the order blocks entered the cache.

Definition (SGLang ``FIFOStrategy``: priority = a node's ``creation_time``;
LMCache's ``FIFOCachePolicy``: the oldest inserted key is evicted first, a hit
does not reorder): among the evictable blocks, the one registered under its
hash earliest (``on_cached``) goes first. Hits and releases never change a
block's place; only a new registration (the block cached again under a new
hash after eviction or invalidation) gives it a new, youngest place.

A block that reaches ``add`` without an ``on_cached`` (a driver that does not
report registrations) counts as inserted at that ``add``.

Backed by a lazy-deletion heap keyed by insertion number (``_lazyheap.py``):
add, remove and pop are O(log n) amortized, on_cached / on_evicted O(1).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from ._lazyheap import LazyHeap
from .base import EvictionPolicy

__all__ = ["FIFOPolicy"]


class FIFOPolicy(EvictionPolicy):
    name = "fifo"
    description = "first cached, first evicted; hits do not reorder (SGLang fifo, LMCache FIFO)"

    def __init__(self, clock=None) -> None:
        super().__init__(clock)
        self._heap = LazyHeap()
        self._seq: dict[int, int] = {}  # cached block -> insertion number
        self._next = 0

    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        self._next += 1
        self._seq[block_id] = self._next

    def add(self, block_id: int) -> None:
        s = self._seq.get(block_id)
        if s is None:
            self._next += 1
            s = self._seq[block_id] = self._next
        self._heap.push(block_id, s)

    def add_many(self, block_ids: Iterable[int]) -> None:
        seq = self._seq
        push = self._heap.push
        for b in block_ids:
            s = seq.get(b)
            if s is None:
                self._next += 1
                s = seq[b] = self._next
            push(b, s)

    def remove(self, block_id: int) -> None:
        if not self._heap.discard(block_id):
            raise KeyError(block_id)

    def remove_many(self, block_ids: Iterable[int]) -> None:
        self._heap.discard_many(block_ids)

    def pop_victim(self) -> int:
        if not self._heap:
            raise self._no_victim()
        return self._heap.pop()

    def pop_victims(self, n: int) -> list[int]:
        if n > len(self._heap):
            raise self._no_victim()
        return self._heap.pop_many(n)

    def peek_victims(self, n: int) -> list[int]:
        return self._heap.peek(n)

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        self._seq.pop(block_id, None)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._seq.pop(block_id, None)

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._heap

    def reset(self) -> None:
        self._heap.clear()
        self._seq.clear()
