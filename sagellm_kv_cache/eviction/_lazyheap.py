"""A binary heap of block ids with lazy deletion: the structure under the keyed policies.

``push(b, k0, k1)`` files block ``b`` under the key ``(k0, k1)``; pushing a
block that is already in the heap re-keys it (the old entry goes stale).
``discard(b)`` forgets a block. Stale entries stay in the list until they
reach the top (``pop`` skips them), until a ``peek`` walks over them (it
takes them out), or until they outnumber the live ones plus a constant, when
the list is rebuilt from the live entries: each event stays O(log n)
amortized and the list never holds more than about twice the live entries.

An entry is ``(k0, k1, token, b)``; it is live iff ``live[b] == token``. A
token is unique per push, so a block re-pushed under the same key leaves no
duplicate live entry behind. Ties on ``(k0, k1)`` go to the earlier push.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator
from heapq import heapify, heappop, heappush

__all__ = ["Entry", "LazyHeap"]

_SLACK = 32  # stale entries tolerated beyond the live count before a rebuild

#: ``(k0, k1, token, block)``
Entry = tuple[float, float, int, int]


class LazyHeap:
    __slots__ = ("_heap", "_live", "_token")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._live: dict[int, int] = {}  # block id -> token of its live entry
        self._token = 0

    def push(self, b: int, k0: float, k1: float = 0) -> None:
        """File ``b`` under ``(k0, k1)`` (re-keys it when present)."""
        self._token = t = self._token + 1
        self._live[b] = t
        heappush(self._heap, (k0, k1, t, b))
        if len(self._heap) > 2 * len(self._live) + _SLACK:
            self._compact()

    def push_many(self, items: Iterable[tuple[int, float, float]]) -> None:
        """``push(b, k0, k1)`` for each ``(b, k0, k1)`` in order."""
        heap, live = self._heap, self._live
        t = self._token
        for b, k0, k1 in items:
            t += 1
            live[b] = t
            heappush(heap, (k0, k1, t, b))
        self._token = t
        if len(heap) > 2 * len(live) + _SLACK:
            self._compact()

    def discard_many(self, blocks: Iterable[int]) -> None:
        """``discard`` each of ``blocks`` (those not in the heap are skipped)."""
        pop = self._live.pop
        for b in blocks:
            pop(b, None)
        if len(self._heap) > 2 * len(self._live) + _SLACK:
            self._compact()

    def discard(self, b: int) -> bool:
        """Forget ``b``; False when it was not in the heap."""
        if self._live.pop(b, None) is None:
            return False
        if len(self._heap) > 2 * len(self._live) + _SLACK:
            self._compact()
        return True

    def pop(self) -> int:
        """The block with the smallest key, removed. Raises IndexError when empty."""
        out = self.pop_many(1) if self._live else ()
        if not out:
            raise IndexError("pop from an empty LazyHeap")
        return out[0]

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

    def pop_below(
        self, bound: tuple[float, float], limit: int, only: Container[int] | None = None
    ) -> list[int]:
        """Up to ``limit`` blocks with keys below ``bound``, smallest first, removed; with
        ``only``, blocks not in it are removed on the way without counting."""
        heap = self._heap
        live = self._live
        b0, b1 = bound
        out: list[int] = []
        while heap and len(out) < limit:
            k0, k1, t, b = heap[0]
            if live.get(b) == t:
                if k0 > b0 or (k0 == b0 and k1 >= b1):
                    break
                del live[b]
                if only is None or b in only:
                    out.append(b)
            heappop(heap)
        return out

    def top_key(self) -> tuple[float, float] | None:
        """``(k0, k1)`` of the smallest live entry (drops stale tops), or None when empty."""
        heap = self._heap
        live = self._live
        while heap:
            k0, k1, t, b = heap[0]
            if live.get(b) == t:
                return k0, k1
            heappop(heap)
        return None

    def peek(
        self,
        n: int,
        after: Callable[[int], tuple[float, float, int] | None] | None = None,
        merge: Iterator[tuple[float, float, int]] | None = None,
        only: Container[int] | None = None,
    ) -> list[int]:
        """Up to ``n`` live blocks in pop order, without removing them.

        ``merge``, when given, yields more ``(k0, k1, b)`` in key order (blocks kept
        outside the heap, e.g. a keyed policy's release-order lane); they are merged
        into the answer by key. ``only``, when given, names the blocks that may be
        answered: the walk drops the entries of others it meets (dormant entries
        their owner re-files when it needs them).

        ``after(b)``, when given, is called after each block ``b`` of the
        answer and may return ``(k0, k1, b2)``: block ``b2`` counts as pushed
        under ``(k0, k1)`` at that moment (a cascade: ``LeafOnly`` uncovering a
        parent); None adds nothing. Nothing is pushed for real.

        Best-first walk down the heap from the root: O(m log m) for the m
        entries visited (n, plus the stale ones met on the way, which the walk
        takes out of the list so that no later walk meets them again).
        """
        heap = self._heap
        live = self._live
        out: list[int] = []
        size = len(heap)
        if n <= 0:
            return out
        frontier: list[tuple[Entry, int]] = [(heap[0], 0)] if size else []
        more: Iterator[tuple[float, float, int]] = iter(()) if merge is None else merge
        first = next(more, None)
        if first is not None:
            frontier.append(((first[0], first[1], 0, first[2]), -2))
            heapify(frontier)
        seen: list[Entry] = []  # live heap entries walked over, smallest first
        stale = 0
        token = self._token
        while frontier and len(out) < n:
            entry, i = heappop(frontier)
            if i == -2:  # from merge: its next one joins the frontier
                nxt = next(more, None)
                if nxt is not None:
                    heappush(frontier, ((nxt[0], nxt[1], 0, nxt[2]), -2))
            b = entry[3]
            if i >= 0 and live.get(b) != entry[2]:
                stale += 1
            elif i >= 0 and only is not None and b not in only:
                del live[b]  # dormant: dropped (taken out of the list below)
                stale += 1
            else:
                out.append(b)
                if i >= 0:
                    seen.append(entry)
                if after is not None:
                    extra = after(b)
                    if extra is not None:
                        token += 1  # later than every real push: ties go to the real ones
                        heappush(frontier, ((extra[0], extra[1], token, int(extra[2])), -1))
            if i >= 0:
                c = 2 * i + 1
                if c < size:
                    heappush(frontier, (heap[c], c))
                    if c + 1 < size:
                        heappush(frontier, (heap[c + 1], c + 1))
        if stale:
            # the walk visits heap entries smallest first, so the entries it saw are the
            # heap's smallest: pop them all and push the live ones back
            for _ in range(stale + len(seen)):
                heappop(heap)
            for e in seen:
                heappush(heap, e)
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
