"""Segmented LRU: a probationary segment for blocks seen once, a protected one for hits.

Definition: Ramakrishna Karedla, J. Spencer Love, Bradley G. Wherry,
"Caching strategies to improve disk system performance", IEEE Computer 27(3),
1994 (segmented LRU); the same two-segment scheme as SGLang's ``slru`` radix
cache policy. ``protected_capacity = int(protected_ratio * capacity)``
(default ratio 0.8; for an unbounded standalone cache the capacity is the
largest number of blocks ever cached at once)::

    on_cached(b)   b joins probation
    on_hit(b)      b in probation -> b moves to protected; b in protected stays
                   then, while protected holds more than protected_capacity blocks,
                   protected's LRU candidate is demoted to the MRU end of probation
    pop_victim()   probation's LRU candidate; protected's LRU candidate if probation has none

Blocks in use and positions: segment *membership* changes only on the events
above, and segment sizes (the protected bound) count every cached block, in
use or evictable. Only evictable blocks are candidates (for eviction and for
demotion). A block's *recency* position is set when it becomes evictable
(``add`` puts it at the MRU end of its segment, as this package's LRU does),
so a request's blocks, released tail-first, leave its prefix more recent than
its suffix; releasing a protected block re-checks the protected bound (the
overflow that could not be demoted while every protected block was in use is
demoted then). A hit on an evictable block (standalone caches) puts it at the
MRU end of protected. Each segment keeps its evictable members in an
``OrderedDict``: every event is O(1) amortised.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from itertools import chain, islice

from ..errors import KVConfigError
from .base import EvictionPolicy

__all__ = ["SLRUPolicy"]

_NONE, _PROB, _PROT = 0, 1, 2


class SLRUPolicy(EvictionPolicy):
    """Segmented LRU with a probationary and a protected segment.

    Args:
        clock: unused (kept for the common constructor).
        protected_ratio: protected segment's share of the capacity (default 0.8).
    """

    name = "slru"
    description = "segmented LRU: probation for new blocks, protected (80%) for hit blocks"
    tracks_hits = True

    def __init__(self, clock=None, protected_ratio: float = 0.8) -> None:
        super().__init__(clock)
        if not 0.0 <= protected_ratio <= 1.0:
            raise KVConfigError(f"slru: protected_ratio must be in [0, 1], got {protected_ratio!r}")
        self.protected_ratio = protected_ratio
        self._max_cached = 0
        self.reset()

    @property
    def protected_capacity(self) -> int:
        c = self.capacity
        if c is None:
            c = self._max_cached
        return int(self.protected_ratio * c)

    def set_capacity(self, num_blocks: int | None) -> None:
        super().set_capacity(num_blocks)
        if num_blocks:
            self._grow(num_blocks - 1)

    def _grow(self, b: int) -> None:
        self._seg += [_NONE] * (max(b + 1, 2 * len(self._seg), 16) - len(self._seg))

    def _demote_overflow(self) -> None:
        cap = self.protected_capacity
        prot, prob, seg = self._prot, self._prob, self._seg
        while self._n_prot > cap and prot:
            b = prot.popitem(last=False)[0]
            prob[b] = None
            seg[b] = _PROB
            self._n_prot -= 1
            self._n_prob += 1

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        if self._seg[block_id] == _PROT:
            self._prot[block_id] = None
            if self._n_prot > self.protected_capacity:
                self._demote_overflow()
        else:
            self._prob[block_id] = None

    def add_many(self, block_ids: Iterable[int]) -> None:
        seg, prob, prot = self._seg, self._prob, self._prot
        cap = self.protected_capacity
        for b in block_ids:
            if seg[b] == _PROT:
                prot[b] = None
                if self._n_prot > cap:
                    self._demote_overflow()
            else:
                prob[b] = None

    def remove(self, block_id: int) -> None:
        del (self._prot if self._seg[block_id] == _PROT else self._prob)[block_id]

    def remove_many(self, block_ids: Iterable[int]) -> None:
        seg, prob, prot = self._seg, self._prob, self._prot
        for b in block_ids:
            del (prot if seg[b] == _PROT else prob)[b]

    def pop_victim(self) -> int:
        if self._prob:
            b = self._prob.popitem(last=False)[0]
            self._n_prob -= 1
        elif self._prot:
            b = self._prot.popitem(last=False)[0]
            self._n_prot -= 1
        else:
            raise self._no_victim()
        self._seg[b] = _NONE
        return b

    def pop_victims(self, n: int) -> list[int]:
        if n > len(self._prob) + len(self._prot):
            raise self._no_victim()
        pop = self.pop_victim
        return [pop() for _ in range(n)]

    def peek_victims(self, n: int) -> list[int]:
        return list(islice(chain(self._prob, self._prot), n))

    def peek_cascade(self, n: int, after: Callable[[int], int]) -> list[int]:
        seg, cap = self._seg, self.protected_capacity
        out: list[int] = []
        add_prob: list[int] = []  # counted as added (MRU end of each segment), in order
        add_prot: list[int] = []
        prob, prot = chain(self._prob, add_prob), chain(self._prot, add_prot)
        left_prob, left_prot, n_prot = len(self._prob), len(self._prot), self._n_prot
        while len(out) < n and left_prob + left_prot:
            if left_prob:
                b = next(prob)
                left_prob -= 1
            else:
                b = next(prot)
                left_prot -= 1
                n_prot -= 1
            out.append(b)
            a = after(b)
            if a < 0:
                continue
            if seg[a] != _PROT:
                add_prob.append(a)
                left_prob += 1
                continue
            add_prot.append(a)
            left_prot += 1
            while n_prot > cap and left_prot:  # add's demotion of the overflow
                add_prob.append(next(prot))
                left_prot -= 1
                n_prot -= 1
                left_prob += 1
        return out

    def __len__(self) -> int:
        return len(self._prob) + len(self._prot)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._prob or block_id in self._prot

    # -- lifecycle -----------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        if block_id >= len(self._seg):
            self._grow(block_id)
        self._seg[block_id] = _PROB
        self._n_prob += 1
        cached = self._n_prob + self._n_prot
        if cached > self._max_cached:
            self._max_cached = cached

    def on_hit(self, block_id: int) -> None:
        seg = self._seg
        if block_id >= len(seg):
            return
        s = seg[block_id]
        if s == _PROB:
            seg[block_id] = _PROT
            self._n_prob -= 1
            self._n_prot += 1
            if block_id in self._prob:
                del self._prob[block_id]
                self._prot[block_id] = None
            if self._n_prot > self.protected_capacity:
                self._demote_overflow()
        elif s == _PROT and block_id in self._prot:
            self._prot.move_to_end(block_id)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        seg = self._seg
        s = seg[block_id]
        if s == _PROB:
            self._n_prob -= 1
            self._prob.pop(block_id, None)
        elif s == _PROT:
            self._n_prot -= 1
            self._prot.pop(block_id, None)
        seg[block_id] = _NONE

    def reset(self) -> None:
        self._seg: list[int] = []  # per block: _NONE / _PROB / _PROT
        self._prob: OrderedDict[int, None] = OrderedDict()  # evictable members, LRU first
        self._prot: OrderedDict[int, None] = OrderedDict()
        self._n_prob = 0  # blocks in probation (in use or evictable)
        self._n_prot = 0
        self._max_cached = 0
        if self.capacity:
            self._grow(self.capacity - 1)

    def stats(self) -> dict:
        """Segment sizes (blocks in use included)."""
        return {
            "probation": self._n_prob,
            "protected": self._n_prot,
            "protected_capacity": self.protected_capacity,
            "evictable": len(self),
        }
