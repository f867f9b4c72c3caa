"""First in, first out: evict in the order blocks entered the cache.

Definition (SGLang ``FIFOStrategy``: priority = a node's ``creation_time``;
LMCache's ``FIFOCachePolicy``: the oldest inserted key is evicted first, a hit
does not reorder): among the evictable blocks, the one registered under its
hash earliest (``on_cached``) goes first. Hits and releases never change a
block's place; only a new registration (the block cached again under a new
hash after eviction or invalidation) gives it a new, youngest place.

A block that reaches ``add`` without an ``on_cached`` (a driver that does not
report registrations) counts as inserted at that ``add``.

Implementation: a binary heap of insertion numbers, each packed with its
block id into one int (``seq << shift | block``; the shift grows, with a
rebuild, when a larger block id shows up). A block's heap entry stays in
place while the block is in use (it is just not a candidate then), so a
block released again under the same insertion number is not pushed again;
an entry that surfaces while its block is in use is dropped and the next
release pushes it again. Per-block state lives in lists indexed by block id
(grown on demand). add, remove and pop are O(log n) amortized, on_cached /
on_evicted O(1); stale entries (left by re-cached blocks) are counted and
the heap is rebuilt when they outnumber the rest.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from heapq import heapify, heappop, heappush

from .base import EvictionPolicy

__all__ = ["FIFOPolicy"]

_SLACK = 32  # stale heap entries tolerated beyond half the heap before a rebuild


class FIFOPolicy(EvictionPolicy):
    name = "fifo"
    description = "first cached, first evicted; hits do not reorder (SGLang fifo, LMCache FIFO)"

    def __init__(self, clock=None) -> None:
        super().__init__(clock)
        self.reset()

    def set_capacity(self, num_blocks: int | None) -> None:
        super().set_capacity(num_blocks)
        if num_blocks:
            self._grow(num_blocks - 1)

    def _grow(self, b: int) -> None:
        n = max(b + 1, 2 * len(self._seq), 16) - len(self._seq)
        self._seq += [0] * n
        self._entry += [0] * n
        self._ev += [False] * n
        size = len(self._seq)
        if size > 1 << self._shift:
            shift = max(size.bit_length(), self._shift)
            old, mask = self._shift, (1 << self._shift) - 1
            self._heap = [(e >> old) << shift | (e & mask) for e in self._heap]
            heapify(self._heap)
            self._shift = shift

    def _compact(self) -> None:
        entry, shift = self._entry, self._shift
        mask = (1 << shift) - 1
        self._heap = [e for e in self._heap if entry[e & mask] == e >> shift]
        heapify(self._heap)
        self._stale = 0

    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        if block_id >= len(self._seq):
            self._grow(block_id)
        self._next = s = self._next + 1
        self._seq[block_id] = s

    def add(self, block_id: int) -> None:
        self.add_many((block_id,))

    def add_many(self, block_ids: Iterable[int]) -> None:
        seq, entry, ev, heap = self._seq, self._entry, self._ev, self._heap
        shift = self._shift
        size = len(ev)
        k = stale = 0
        for b in block_ids:
            if b >= size:
                self._grow(b)
                seq, entry, ev, heap = self._seq, self._entry, self._ev, self._heap
                shift = self._shift
                size = len(ev)
            if ev[b]:
                continue
            ev[b] = True
            k += 1
            s = seq[b]
            if not s:
                self._next = s = self._next + 1
                seq[b] = s
            e = entry[b]
            if e != s:  # no entry under the current insertion number: push one
                if e:
                    stale += 1
                entry[b] = s
                heappush(heap, s << shift | b)
        self._n_ev += k
        if stale:
            self._stale += stale
            if self._stale > (len(heap) >> 1) + _SLACK:
                self._compact()

    def remove(self, block_id: int) -> None:
        self.remove_many((block_id,))

    def remove_many(self, block_ids: Iterable[int]) -> None:
        ev = self._ev
        size = len(ev)
        k = 0
        try:
            for b in block_ids:
                if not (0 <= b < size and ev[b]):
                    raise KeyError(b)
                ev[b] = False  # lazy: the heap entry stays (reused on the next release)
                k += 1
        finally:
            self._n_ev -= k

    def pop_victim(self) -> int:
        return self.pop_victims(1)[0]

    def pop_victims(self, n: int) -> list[int]:
        if n > self._n_ev:
            raise self._no_victim()
        heap, entry, ev = self._heap, self._entry, self._ev
        shift = self._shift
        mask = (1 << shift) - 1
        out: list[int] = []
        append = out.append
        stale = 0
        k = 0
        while k < n:
            e = heappop(heap)
            b = e & mask
            if entry[b] == e >> shift:
                entry[b] = 0
                if ev[b]:
                    ev[b] = False
                    append(b)
                    k += 1
            else:
                stale += 1
        self._stale -= stale
        self._n_ev -= n
        return out

    def peek_victims(self, n: int) -> list[int]:
        """Best-first walk down the heap from the root: O(m log m), m entries visited."""
        heap, entry, ev = self._heap, self._entry, self._ev
        shift = self._shift
        mask = (1 << shift) - 1
        out: list[int] = []
        size = len(heap)
        if n <= 0 or not size:
            return out
        frontier = [(heap[0], 0)]
        while frontier and len(out) < n:
            e, i = heappop(frontier)
            b = e & mask
            if ev[b] and entry[b] == e >> shift:
                out.append(b)
            c = 2 * i + 1
            if c < size:
                heappush(frontier, (heap[c], c))
                if c + 1 < size:
                    heappush(frontier, (heap[c + 1], c + 1))
        return out

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        if block_id < len(self._seq):
            self._seq[block_id] = 0

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        if block_id < len(self._seq):
            self._seq[block_id] = 0

    def __len__(self) -> int:
        return self._n_ev

    def __contains__(self, block_id: object) -> bool:
        ev = self._ev
        return type(block_id) is int and 0 <= block_id < len(ev) and ev[block_id]

    def reset(self) -> None:
        self._seq: list[int] = []  # per block: insertion number (0: not cached)
        self._entry: list[int] = []  # per block: insertion number of its heap entry (0: none)
        self._ev: list[bool] = []  # per block: evictable now
        self._heap: list[int] = []  # seq << shift | block, of evictable blocks (+ in use, stale)
        self._shift = 16
        self._next = 0
        self._n_ev = 0
        self._stale = 0
        if self.capacity:
            self._grow(self.capacity - 1)
