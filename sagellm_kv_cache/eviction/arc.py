"""ARC: adaptive replacement between a recency list and a frequency list.

Definition: Nimrod Megiddo and Dharmendra S. Modha, "ARC: A Self-Tuning, Low
Overhead Replacement Cache", USENIX FAST 2003 (Fig. 4, procedure ARC(c)).
``c`` is the pool's capacity in blocks (for an unbounded standalone cache: the
largest number of blocks ever cached at once). T1/T2 hold cached blocks,
B1/B2 hold the *hashes* of blocks evicted from T1/T2 (ghosts), ``p`` is the
adaptive target size of T1.

The paper's four cases, split over the events the pool sends (the pool picks
its victims *before* it registers the block that needs the room, so REPLACE
runs in ``pop_victim`` and the rest in ``on_cached``)::

    on_hit(b)        case I:   b in T1 -> moves to T2; b in T2 stays in T2
    on_cached(b, h)  case II:  h in B1: p = min(c, p + max(1, |B2|/|B1|)); h leaves B1; b -> T2
                     case III: h in B2: p = max(0, p - max(1, |B1|/|B2|)); h leaves B2; b -> T2
                     case IV:  otherwise b -> T1, after trimming the ghosts:
                               |T1|+|B1| >= c            -> drop B1's LRU hash (if any)
                               elif |T1|+|T2|+|B1|+|B2| >= 2c -> drop B2's LRU hash (if any)
    pop_victim()     REPLACE:  T1 has a candidate and (|T1| > p or T2 has none)
                                 -> evict T1's LRU candidate, its hash enters B1 (MRU end)
                               else -> evict T2's LRU candidate, its hash enters B2

The REPLACE test drops the paper's "x in B2 and |T1| = p" term: the block
being brought in is not known when the pool asks for a victim. The victim's
hash (kept from ``on_cached``) enters B1/B2 as it is popped; then B1 (B2) is
trimmed from its LRU end while |T1|+|B1| > c (|T1|+|T2|+|B1|+|B2| > 2c),
which only matters when c grows or blocks were invalidated.

Blocks in use and positions: list *membership* (T1 or T2) changes on the
events above and the sizes |T1|, |T2| (which drive ``p`` and REPLACE) count
every cached block, in use or not. Only evictable blocks are candidates. A
block's *recency* position is set when it becomes evictable (``add``: MRU end
of its list), as in this package's LRU: a request's blocks, released
tail-first, leave its prefix more recent than its suffix. A hit on an
evictable block (standalone caches) moves it to the MRU end of T2. Each list
keeps its evictable members in an ``OrderedDict``, so every event is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from itertools import chain

from .base import EvictionPolicy

__all__ = ["ARCPolicy"]

_NONE, _T1, _T2 = 0, 1, 2


def _none(block_id: int) -> int:
    return -1


class ARCPolicy(EvictionPolicy):
    """ARC (FAST'03) over block ids; ghost lists B1/B2 are keyed by block hash."""

    name = "arc"
    p: float  # adaptive target size of T1
    _n1: int  # blocks in T1 (in use or evictable)
    _n2: int
    description = "ARC (FAST'03): recency list T1 + frequency list T2, adaptive target p, ghosts"
    tracks_hits = True

    def __init__(self, clock=None) -> None:
        super().__init__(clock)
        self._max_cached = 0
        self.reset()

    def _c(self) -> int:
        c = self.capacity
        return c if c is not None else max(1, self._max_cached)

    def set_capacity(self, num_blocks: int | None) -> None:
        super().set_capacity(num_blocks)
        if num_blocks:
            self._grow(num_blocks - 1)

    def _grow(self, b: int) -> None:
        n = max(b + 1, 2 * len(self._list), 16) - len(self._list)
        self._list += [_NONE] * n
        self._hash += [None] * n

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        (self._t1 if self._list[block_id] == _T1 else self._t2)[block_id] = None

    def add_many(self, block_ids: Iterable[int]) -> None:
        lst, t1, t2 = self._list, self._t1, self._t2
        for b in block_ids:
            (t1 if lst[b] == _T1 else t2)[b] = None

    def remove(self, block_id: int) -> None:
        del (self._t1 if self._list[block_id] == _T1 else self._t2)[block_id]

    def remove_many(self, block_ids: Iterable[int]) -> None:
        lst, t1, t2 = self._list, self._t1, self._t2
        for b in block_ids:
            del (t1 if lst[b] == _T1 else t2)[b]

    def pop_victim(self) -> int:
        t1, t2 = self._t1, self._t2
        if t1 and (self._n1 > self.p or not t2):
            b = t1.popitem(last=False)[0]
            self._n1 -= 1
            ghost = self._b1
        elif t2:
            b = t2.popitem(last=False)[0]
            self._n2 -= 1
            ghost = self._b2
        else:
            raise self._no_victim()
        self._list[b] = _NONE
        ghost[self._hash[b]] = None  # MRU end of B1 / B2
        self._hash[b] = None
        if ghost is self._b1:
            c = self._c()
            while self._n1 + len(ghost) > c:
                ghost.popitem(last=False)
        else:
            c2 = 2 * self._c()
            while ghost and self._n1 + self._n2 + len(self._b1) + len(ghost) > c2:
                ghost.popitem(last=False)
        return b

    def pop_victims(self, n: int) -> list[int]:
        if n > len(self._t1) + len(self._t2):
            raise self._no_victim()
        pop = self.pop_victim
        return [pop() for _ in range(n)]

    def peek_victims(self, n: int) -> list[int]:
        return self.peek_cascade(n, _none)

    def peek_cascade(self, n: int, after: Callable[[int], int]) -> list[int]:
        # REPLACE depends only on |T1| and p, which popping changes: walk both lists
        lst = self._list
        out: list[int] = []
        add1: list[int] = []  # counted as added (MRU end of T1 / T2), in order
        add2: list[int] = []
        i1, i2 = chain(self._t1, add1), chain(self._t2, add2)
        left1, left2, n1 = len(self._t1), len(self._t2), self._n1
        while len(out) < n and left1 + left2:
            if left1 and (n1 > self.p or not left2):
                b = next(i1)
                left1 -= 1
                n1 -= 1
            else:
                b = next(i2)
                left2 -= 1
            out.append(b)
            a = after(b)
            if a >= 0:
                if lst[a] == _T1:
                    add1.append(a)
                    left1 += 1
                else:
                    add2.append(a)
                    left2 += 1
        return out

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._t1 or block_id in self._t2

    # -- lifecycle -----------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        lst = self._list
        if block_id >= len(lst):
            self._grow(block_id)
            lst = self._list
        b1 = self._b1
        b2 = self._b2
        if block_hash in b1:  # case II
            self.p = min(self._c(), self.p + max(1.0, len(b2) / len(b1)))
            del b1[block_hash]
            lst[block_id] = _T2
            self._n2 += 1
        elif block_hash in b2:  # case III
            self.p = max(0.0, self.p - max(1.0, len(b1) / len(b2)))
            del b2[block_hash]
            lst[block_id] = _T2
            self._n2 += 1
        else:  # case IV
            c = self.capacity
            if c is None:
                c = self._c()
            n1 = self._n1
            if n1 + len(b1) >= c:
                if b1:
                    b1.popitem(last=False)
            elif b2 and n1 + self._n2 + len(b1) + len(b2) >= 2 * c:
                b2.popitem(last=False)
            lst[block_id] = _T1
            self._n1 = n1 + 1
        self._hash[block_id] = block_hash
        if self.capacity is None:
            cached = self._n1 + self._n2
            if cached > self._max_cached:
                self._max_cached = cached

    def on_hit(self, block_id: int) -> None:
        lst = self._list
        if block_id >= len(lst):
            return
        state = lst[block_id]
        if state == _T1:
            lst[block_id] = _T2
            self._n1 -= 1
            self._n2 += 1
            if block_id in self._t1:
                del self._t1[block_id]
                self._t2[block_id] = None
        elif state == _T2 and block_id in self._t2:
            self._t2.move_to_end(block_id)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        lst = self._list
        state = lst[block_id]
        if state == _T1:
            self._n1 -= 1
            self._t1.pop(block_id, None)
        elif state == _T2:
            self._n2 -= 1
            self._t2.pop(block_id, None)
        lst[block_id] = _NONE
        self._hash[block_id] = None

    def reset(self) -> None:
        self._list: list[int] = []  # per block: _NONE / _T1 / _T2
        self._hash: list[Hashable | None] = []  # per block: its hash while cached
        self._t1: OrderedDict[int, None] = OrderedDict()  # evictable T1 members, LRU first
        self._t2: OrderedDict[int, None] = OrderedDict()
        self._b1: OrderedDict[Hashable, None] = OrderedDict()  # ghost hashes, LRU first
        self._b2: OrderedDict[Hashable, None] = OrderedDict()
        self._n1 = 0  # blocks in T1 (in use or evictable)
        self._n2 = 0
        self.p = 0.0
        self._max_cached = 0
        if self.capacity:
            self._grow(self.capacity - 1)

    def stats(self) -> dict:
        """List sizes (blocks in use included), ghost lengths and the target ``p``."""
        return {
            "t1": self._n1,
            "t2": self._n2,
            "b1": len(self._b1),
            "b2": len(self._b2),
            "p": self.p,
            "evictable": len(self),
        }
