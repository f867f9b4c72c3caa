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
MRU end of protected. The segments are ``twolists.TwoListPolicy``'s lists
(probation its list 1): every event is O(1) amortised.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from ..errors import KVConfigError
from .twolists import TwoListPolicy

__all__ = ["SLRUPolicy"]


class SLRUPolicy(TwoListPolicy):
    """Segmented LRU with a probationary and a protected segment.

    Args:
        clock: unused (kept for the common constructor).
        protected_ratio: protected segment's share of the capacity (default 0.8).
    """

    name = "slru"
    description = "segmented LRU: probation for new blocks, protected (80%) for hit blocks"
    tracks_hits = True
    _second_bounded = True

    def __init__(
        self, clock: Callable[[], float] | None = None, protected_ratio: float = 0.8
    ) -> None:
        if not 0.0 <= protected_ratio <= 1.0:
            raise KVConfigError(f"slru: protected_ratio must be in [0, 1], got {protected_ratio!r}")
        self.protected_ratio = protected_ratio
        super().__init__(clock)

    @property
    def protected_capacity(self) -> int:
        c = self.capacity
        if c is None:
            c = self._max_cached
        return int(self.protected_ratio * c)

    # -- two lists -------------------------------------------------------------
    def _first_due(self, n1: int, left1: int, left2: int) -> bool:
        return True  # probation's LRU candidate whenever probation has one

    def _second_cap(self) -> float:
        return self.protected_capacity

    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        self._join(block_id, False)

    def stats(self) -> dict:
        """Segment sizes (blocks in use included)."""
        return {
            "probation": self._n1,
            "protected": self._n2,
            "protected_capacity": self.protected_capacity,
            "evictable": len(self),
        }
