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
evictable block (standalone caches) moves it to the MRU end of T2. The two
lists are ``twolists.TwoListPolicy``'s (T1 its list 1): every event is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from .twolists import TwoListPolicy

__all__ = ["ARCPolicy"]


class ARCPolicy(TwoListPolicy):
    """ARC (FAST'03) over block ids; ghost lists B1/B2 are keyed by block hash."""

    name = "arc"
    description = "ARC (FAST'03): recency list T1 + frequency list T2, adaptive target p, ghosts"
    tracks_hits = True
    stable_victim_order = False  # T1 or T2 is decided per eviction, by p and the hits
    _unlisted_second = True
    p: float  # adaptive target size of T1

    def _c(self) -> int:
        c = self.capacity
        return c if c is not None else max(1, self._max_cached)

    # -- two lists: REPLACE ------------------------------------------------------
    def _first_due(self, n1: int, left1: int, left2: int) -> bool:
        return n1 > self.p or not left2

    def _on_victim(self, block_id: int, from_first: bool) -> None:
        ghost = self._b1 if from_first else self._b2
        ghost[self._hash.pop(block_id)] = None  # MRU end of B1 / B2
        if from_first:
            c = self._c()
            while self._n1 + len(ghost) > c:
                ghost.popitem(last=False)
        else:
            c2 = 2 * self._c()
            while ghost and self._n1 + self._n2 + len(self._b1) + len(ghost) > c2:
                ghost.popitem(last=False)

    # -- lifecycle -----------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        b1 = self._b1
        b2 = self._b2
        if block_hash in b1:  # case II
            self.p = min(self._c(), self.p + max(1.0, len(b2) / len(b1)))
            del b1[block_hash]
            self._join(block_id, True)
        elif block_hash in b2:  # case III
            self.p = max(0.0, self.p - max(1.0, len(b1) / len(b2)))
            del b2[block_hash]
            self._join(block_id, True)
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
            self._join(block_id, False)
        self._hash[block_id] = block_hash

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        super().on_removed(block_id, block_hash)
        self._hash.pop(block_id, None)

    def reset(self) -> None:
        super().reset()
        self._hash: dict[int, Hashable] = {}  # cached block -> its hash
        self._b1: OrderedDict[Hashable, None] = OrderedDict()  # ghost hashes, LRU first
        self._b2: OrderedDict[Hashable, None] = OrderedDict()
        self.p = 0.0

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
