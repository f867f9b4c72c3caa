"""A binary heap of block ids with lazy deletion, shared by the keyed policies.

``push(b, k0, k1)`` files block ``b`` under the key ``(k0, k1)``; pushing a
block that is already in the heap re-keys it (the old entry goes stale).
``discard(b)`` forgets a block. Stale entries stay in the list until they
reach the top (``pop`` skips them) or until they outnumber the live ones plus
a constant, when the list is rebuilt from the live entries: each event stays
O(log n) amortized and the list never holds more than about twice the live
entries.

An entry is ``(k0, k1, token, b)``; it is live iff ``live[b] == token``. A
token is unique per push, so a block re-pushed under the same key leaves no
duplicate live entry behind. Ties on ``(k0, k1)`` go to the earlier push.
"""

from __future__ import annotations

from collections.abc import Iterable
from heapq import heapify, heappop, heappush

__all__ = ["LazyHeap"]

_SLACK = 32  # stale entries tolerated beyond the live count before a rebuild


class LazyHeap:
    __slots__ = ("_heap", "_live", "_token")

    def __init__(self) -> None:
        self._heap: list[tuple] = []
        self._live: dict[int, int] = {}  # block id -> token of its live entry
        self._token = 0

    def push(self, b: int, k0: float, k1: float = 0) -> None:
        """File ``b`` under ``(k0, k1)`` (re-keys it when present)."""
        self._token = t = self._token + 1
        self._live[b] = t
        heappush(self._heap, (k0, k1, t, b))
        if len(self._heap) > 2 * len(self._live) + _SLACK:
            self._compact()

    def discard(self, b: int) -> bool:
        """Forget ``b``; False when it was not in the heap."""
        if self._live.pop(b, None) is None:
            return False
        if len(self._heap) > 2 * len(self._live) + _SLACK:
            self._compact()
        return True

    def discard_many(self, blocks: Iterable[int]) -> None:
        """``discard`` each of ``blocks`` (KeyError on one not in the heap; earlier ones go)."""
        live = self._live
        for b in blocks:
            del live[b]
        if len(self._heap) > 2 * len(live) + _SLACK:
            self._compact()

    def pop(self) -> int:
        """The block with the smallest key, removed. Raises IndexError when empty."""
        heap = self._heap
        live = self._live
        while heap:
            _, _, t, b = heappop(heap)
            if live.get(b) == t:
                del live[b]
                return b
        raise IndexError("pop from an empty LazyHeap")

    def pop_many(self, n: int) -> list[int]:
        """The ``n`` blocks with the smallest keys, removed (caller checked ``n <= len``)."""
        heap = self._heap
        live = self._live
        out: list[int] = []
        append = out.append
        while len(out) < n:
            _, _, t, b = heappop(heap)
            if live.get(b) == t:
                del live[b]
                append(b)
        return out

    def top_key(self) -> tuple | None:
        """``(k0, k1)`` of the smallest live entry (drops stale tops), or None when empty."""
        heap = self._heap
        live = self._live
        while heap:
            k0, k1, t, b = heap[0]
            if live.get(b) == t:
                return k0, k1
            heappop(heap)
        return None

    def peek(self, n: int) -> list[int]:
        """Up to ``n`` live blocks in pop order, without removing them.

        Best-first walk down the heap from the root: O(m log m) where m is
        the number of entries visited (n plus the stale ones met on the way).
        """
        heap = self._heap
        live = self._live
        out: list[int] = []
        if n <= 0 or not heap:
            return out
        size = len(heap)
        frontier = [(heap[0], 0)]
        while frontier and len(out) < n:
            entry, i = heappop(frontier)
            if live.get(entry[3]) == entry[2]:
                out.append(entry[3])
            c = 2 * i + 1
            if c < size:
                heappush(frontier, (heap[c], c))
                if c + 1 < size:
                    heappush(frontier, (heap[c + 1], c + 1))
        return out

    def _compact(self) -> None:
        live = self._live
        self._heap = [e for e in self._heap if live.get(e[3]) == e[2]]
        heapify(self._heap)

    def clear(self) -> None:
        self._heap.clear()
        self._live.clear()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, b: object) -> bool:
        return b in self._live
