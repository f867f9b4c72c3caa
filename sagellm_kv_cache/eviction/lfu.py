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

Implementation (the classic O(1) LFU layout): one ``OrderedDict`` per
frequency holds that frequency's evictable blocks in release order (block ->
release number), and a small heap holds the frequencies that have one, so
add, remove and pop are O(1) plus O(log f) for a new frequency. A block hit
while evictable (standalone caches; the pool takes a block out of the order
before its hit) keeps its release number under a higher frequency, out of
that frequency's release order: it moves to a lazy-deletion heap keyed by
``(frequency, release number)``, and a pop takes the smaller of the fronts.
A hit on a block in use is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from heapq import heappop, heappush

from ._lazyheap import LazyHeap
from .base import EvictionPolicy

__all__ = ["LFUPolicy"]


class LFUPolicy(EvictionPolicy):
    name = "lfu"
    description = "fewest accesses (insert + hits) first, ties least recently released (SGLang lfu)"
    tracks_hits = True

    def __init__(self, clock=None) -> None:
        super().__init__(clock)
        self._freq: dict[int, int] = {}  # cached block -> access count
        self._levels: dict[int, OrderedDict[int, int]] = {}  # frequency -> block -> release no.
        self._level_heap: list[int] = []  # frequencies in _levels (an emptied one lingers)
        self._side = LazyHeap()  # evictable blocks hit while evictable: (frequency, release no.)
        self._side_rel: dict[int, int] = {}  # block in _side -> release number
        self._side_key: dict[int, tuple[int, int]] = {}  # block in _side -> its key there
        self._where: dict[int, int] = {}  # evictable block in a level -> that frequency
        self._next = 0

    def frequency(self, block_id: int) -> int:
        """Accesses counted for ``block_id``'s current hash (0 when not cached)."""
        return self._freq.get(block_id, 0)

    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        self._freq[block_id] = 1

    def on_hit(self, block_id: int) -> None:
        freq = self._freq
        f = freq.get(block_id)
        if f is None:
            return
        freq[block_id] = f + 1
        if not self._where or block_id not in self._where:
            r = self._side_rel.get(block_id)
            if r is not None:
                self._side.push(block_id, f + 1, r)
                self._side_key[block_id] = (f + 1, r)
            return
        # a hit on an evictable block (standalone caches): re-file it at its release place
        r = self._levels[self._where.pop(block_id)].pop(block_id)
        self._side.push(block_id, f + 1, r)
        self._side_rel[block_id] = r
        self._side_key[block_id] = (f + 1, r)

    def add(self, block_id: int) -> None:
        self._next = r = self._next + 1
        f = self._freq.get(block_id)
        if f is None:
            f = self._freq[block_id] = 1
        q = self._levels.get(f)
        if q is None:
            q = self._levels[f] = OrderedDict()
            heappush(self._level_heap, f)
        q[block_id] = r
        self._where[block_id] = f

    def add_many(self, block_ids: Iterable[int]) -> None:
        freq = self._freq
        levels = self._levels
        where = self._where
        r = self._next
        for b in block_ids:
            r += 1
            f = freq.get(b)
            if f is None:
                f = freq[b] = 1
            q = levels.get(f)
            if q is None:
                q = levels[f] = OrderedDict()
                heappush(self._level_heap, f)
            q[b] = r
            where[b] = f
        self._next = r

    def remove(self, block_id: int) -> None:
        f = self._where.pop(block_id, None)
        if f is None:
            del self._side_rel[block_id]  # KeyError: not evictable
            del self._side_key[block_id]
            self._side.discard(block_id)
        else:
            del self._levels[f][block_id]

    def remove_many(self, block_ids: Iterable[int]) -> None:
        if self._side_rel:
            remove = self.remove
            for b in block_ids:
                remove(b)
            return
        levels = self._levels
        pop = self._where.pop
        for b in block_ids:
            del levels[pop(b)][b]

    def pop_victim(self) -> int:
        return self.pop_victims(1)[0]

    def pop_victims(self, n: int) -> list[int]:
        where = self._where
        if n > len(where) + len(self._side_rel):
            raise self._no_victim()
        levels, lheap = self._levels, self._level_heap
        side, side_rel = self._side, self._side_rel
        out: list[int] = []
        while len(out) < n:
            q = None
            while lheap:
                f = lheap[0]
                q = levels[f]
                if q:
                    break
                heappop(lheap)
                del levels[f]
                q = None
            if side_rel:
                top = side.top_key()
                if q is None or top < (f, next(iter(q.values()))):
                    b = side.pop()
                    del side_rel[b]
                    del self._side_key[b]
                    out.append(b)
                    continue
            # the front of the lowest frequency (no side block before it within this level)
            popitem = q.popitem
            k = min(n - len(out), len(q))
            for _ in range(k):
                b = popitem(False)[0]
                del where[b]
                out.append(b)
                if side_rel:
                    break
        return out

    def peek_victims(self, n: int) -> list[int]:
        cand: list[tuple[tuple[int, int], int]] = []
        for f in sorted(f for f, q in self._levels.items() if q):
            q = self._levels[f]
            for b, r in q.items():
                if len(cand) >= n:
                    break
                cand.append(((f, r), b))
            if len(cand) >= n:
                break
        if self._side_rel:
            key = self._side_key
            cand += [(key[b], b) for b in self._side.peek(n)]
            cand.sort()
        return [b for _, b in cand[:n]]

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        self._freq.pop(block_id, None)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._freq.pop(block_id, None)

    def __len__(self) -> int:
        return len(self._where) + len(self._side_rel)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._where or block_id in self._side_rel

    def reset(self) -> None:
        self._freq.clear()
        self._levels.clear()
        self._level_heap.clear()
        self._side.clear()
        self._side_rel.clear()
        self._side_key.clear()
        self._where.clear()
