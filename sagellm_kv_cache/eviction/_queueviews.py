"""Views of S3-FIFO's queues for its one victim loop (``s3fifo.S3FIFOPolicy._select``).

``Heaps`` works on the real heaps (a pop); ``HeapWalks`` and ``Overlay`` answer
the same calls without changing anything (a peek): best-first walks down the
real heaps, and copy-on-write layers over the per-block lists and the
sequence-number -> block map.
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import Any

__all__ = ["HeapWalks", "Heaps", "Overlay"]


class Overlay:
    """A per-block list seen through a copy-on-write layer: writes stay here."""

    __slots__ = ("base", "local")

    def __init__(self, base: list) -> None:
        self.base = base
        self.local: dict[int, Any] = {}

    def __getitem__(self, i: int) -> Any:
        local = self.local
        return local[i] if i in local else self.base[i]

    def __setitem__(self, i: int, v: Any) -> None:
        self.local[i] = v


class Heaps:
    """S's and M's heaps of sequence numbers (``slot``: number -> block), for the victim
    loop: ``top_*`` drops stale entries (blocks now in use, moved or dropped) and gives the
    number of the oldest candidate (-1: none), ``pop_*`` takes it and gives its block."""

    __slots__ = ("ev", "hm", "hs", "seq", "slot")

    def __init__(self, hs: list[int], hm: list[int], slot: dict, ev: Any, seq: Any) -> None:
        self.hs, self.hm, self.slot, self.ev, self.seq = hs, hm, slot, ev, seq

    def _top(self, h: list[int]) -> int:
        slot, ev, seq = self.slot, self.ev, self.seq
        while h:
            s = h[0]
            b = slot[s]
            if ev[b] and seq[b] == s:
                return s
            heappop(h)
            del slot[s]
        return -1

    def top_s(self) -> int:
        return self._top(self.hs)

    def top_m(self) -> int:
        return self._top(self.hm)

    def pop_s(self) -> int:
        return self.slot.pop(heappop(self.hs))

    def pop_m(self) -> int:
        return self.slot.pop(heappop(self.hm))

    def push(self, s: int, b: int, main: bool) -> None:
        """Block ``b`` is a candidate under number ``s`` (kept if its entry is still there)."""
        slot = self.slot
        if s not in slot:
            slot[s] = b
            heappush(self.hm if main else self.hs, s)

    def evicted(self, b: int) -> None:
        self.ev[b] = False

    def revive(self, b: int) -> None:
        self.ev[b] = True


class HeapWalks(Heaps):
    """``Heaps`` read-only: best-first walks down the real heaps, numbers pushed on the way
    in a local heap, slot changes in a local layer."""

    __slots__ = ("gone", "mine", "walks")

    def __init__(self, hs: list[int], hm: list[int], slot: dict, ev: Any, seq: Any) -> None:
        super().__init__(hs, hm, slot, ev, seq)
        self.walks = ([(hs[0], 0)] if hs else [], [(hm[0], 0)] if hm else [])
        self.mine: tuple[list[int], list[int]] = ([], [])  # pushed numbers, per queue
        self.gone: dict[int, int] = {}  # slot overlay: number -> block, -1 for dropped

    def _slot(self, s: int) -> int:
        b = self.gone.get(s)
        return self.slot[s] if b is None else b

    def _next(self, q: int, take: bool) -> int:
        """The smallest number left in queue ``q`` (0: S, 1: M), taken when ``take``."""
        walk, mine = self.walks[q], self.mine[q]
        if walk and (not mine or walk[0][0] < mine[0]):
            s, i = walk[0]
            if take:
                heappop(walk)
                h = self.hs if q == 0 else self.hm
                c = 2 * i + 1
                if c < len(h):
                    heappush(walk, (h[c], c))
                    if c + 1 < len(h):
                        heappush(walk, (h[c + 1], c + 1))
            return s
        if mine:
            return heappop(mine) if take else mine[0]
        return -1

    def _top_q(self, q: int) -> int:
        ev, seq = self.ev, self.seq
        while True:
            s = self._next(q, False)
            if s < 0:
                return -1
            b = self._slot(s)
            if b >= 0 and ev[b] and seq[b] == s:
                return s
            self._next(q, True)
            self.gone[s] = -1

    def top_s(self) -> int:
        return self._top_q(0)

    def top_m(self) -> int:
        return self._top_q(1)

    def pop_s(self) -> int:
        s = self._next(0, True)
        b = self._slot(s)
        self.gone[s] = -1
        return b

    def pop_m(self) -> int:
        s = self._next(1, True)
        b = self._slot(s)
        self.gone[s] = -1
        return b

    def push(self, s: int, b: int, main: bool) -> None:
        cur = self.gone.get(s)
        if (cur is None and s in self.slot) or (cur is not None and cur >= 0):
            return
        self.gone[s] = b
        heappush(self.mine[1 if main else 0], s)
