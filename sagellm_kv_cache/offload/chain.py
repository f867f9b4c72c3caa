"""The write path down the lower tiers: admission, spill (write-back) and write-through.

::

    blocks leaving a tier --admitted?--> tier i --its victims--> admitted? --> tier i+1 ...
                              | no                                              |
                              +-- dropped (counted, hit counts forgotten)       +-- last tier
                                                                                    drops them

Write policies:

* ``write_policy="write_back"`` (default): a block evicted from a tier is
  inserted at the most recent end of the tier below (if admitted), whose own
  victims go one further down; the last tier drops its victims.
* ``write_policy="write_through"``: a block is written to every lower tier as
  soon as it is cached on the device (or, with ``admit_after_hits=N``, when
  its N-th hit is seen); eviction then only refreshes the copy below.
* ``admit_after_hits=N``: a block enters a lower tier only once it has been
  hit N times (0: always).
* ``promote_on_hit=True``: a hit in a lower tier *moves* the block up
  (exclusive caching: each block lives in one tier); ``False`` copies it and
  refreshes the lower copy (inclusive). Write-through is always inclusive.

Why an exclusive chain of LRU tiers equals one LRU of the summed size (what
``tests/test_tiered_replay.py`` pins): put the lower tier's order before the
device's, least recent first. A device victim is the device's least recent
block and enters the tier below as its most recent one, so the concatenated
order is unchanged by a spill; the lower tier drops from its least recent
end, which is the global least recent block; a hit anywhere takes the block
out of the order and its release puts it at the global most recent end, as
in one pool. Promotions leave the lower tier before spills enter it, so the
free slots add up as well: the chain evicts exactly the blocks, in the same
order, that one pool of ``sum(capacities)`` blocks would.

Every function takes the tiers it works on as an argument (the whole chain,
or the part below a given tier) and appends its byte-moving steps to a
``CopyPlan``; nothing here holds a lock or touches the device pool.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from .plan import Select
from .staging import Buf
from .tiers import LowerTier, TierStats

__all__ = ["Admission", "spill", "write_through"]


class Admission:
    """The ``admit_after_hits`` rule: a block enters a lower tier once it was hit N times.

    Args:
        admit_after_hits: hits a block needs (0: every block is admitted, nothing counted).
        held: whether some tier (the device included) still holds a hash; hit
            counts of blocks no tier holds are forgotten.
    """

    __slots__ = ("admit_after_hits", "held", "hits")

    def __init__(self, admit_after_hits: int, held: Callable[[Hashable], bool]) -> None:
        self.admit_after_hits = admit_after_hits
        self.held = held
        self.hits: dict[Hashable, int] = {}

    def count(self, block_hashes: Sequence[Hashable]) -> None:
        """One hit for each of ``block_hashes``."""
        if self.admit_after_hits:
            hits = self.hits
            for h in block_hashes:
                hits[h] = hits.get(h, 0) + 1

    def hit_count(self, block_hash: Hashable) -> int:
        return self.hits.get(block_hash, 0)

    def admitted(self, block_hashes: Sequence[Hashable]) -> list[int]:
        """Indices of the hashes allowed into a lower tier."""
        n = self.admit_after_hits
        if not n:
            return list(range(len(block_hashes)))
        hits = self.hits
        return [i for i, h in enumerate(block_hashes) if hits.get(h, 0) >= n]

    def forget(self, block_hashes: Sequence[Hashable]) -> None:
        """Drop hit counts of blocks no tier holds any more."""
        if not self.admit_after_hits:
            return
        for h in block_hashes:
            if not self.held(h):
                self.hits.pop(h, None)

    def discard(self, block_hashes: Sequence[Hashable]) -> None:
        """Drop hit counts unconditionally (invalidated blocks)."""
        for h in block_hashes:
            self.hits.pop(h, None)


def spill(
    tiers: Sequence[LowerTier],
    block_hashes: list[Hashable],
    src: Buf | None,
    plan: Any,
    admission: Admission,
    stats: TierStats,
) -> int:
    """Write-back of blocks leaving the tier above ``tiers`` (counters ``stats``) down the
    chain: admitted blocks enter ``tiers[0]``, whose victims continue to ``tiers[1]``...;
    the last tier drops its victims. ``src`` holds their bytes (``None``: metadata-only).

    Returns:
        how many blocks were written into some tier.
    """
    hashes = block_hashes
    spilled = 0
    for i, tier in enumerate(tiers):
        if not hashes:
            return spilled
        keep = admission.admitted(hashes)
        if len(keep) != len(hashes):
            kept = set(keep)
            dropped = [hashes[j] for j in range(len(hashes)) if j not in kept]
            stats.dropped_blocks += len(dropped)
            admission.forget(dropped)
            if src is not None:
                sub = Buf(f"{src.label}|admitted")
                plan.append(Select(src, keep, sub))
                src = sub
            hashes = [hashes[j] for j in keep]
        if not hashes:
            return spilled
        spilled += len(hashes)
        has_below = i + 1 < len(tiers)
        hashes, src = tier.insert(
            hashes, src, plan, keep_victim_bytes=has_below and src is not None
        )
        stats = tier.stats
    if hashes:
        stats.dropped_blocks += len(hashes)
        admission.forget(hashes)
    return spilled


def write_through(
    tiers: Sequence[LowerTier],
    block_hashes: list[Hashable],
    src: Buf | None,
    plan: Any,
    admission: Admission,
    stats: TierStats,
) -> None:
    """Write-through: blocks into every one of ``tiers`` (inclusive). A tier's victims
    continue down as write-back (``spill`` over the tiers below it, admission drops
    counted on ``stats``); the last tier drops its victims."""
    for i, tier in enumerate(tiers):
        below = tiers[i + 1 :]
        victims, vsrc = tier.insert(
            block_hashes, src, plan, keep_victim_bytes=bool(below) and src is not None
        )
        if victims:  # no tier below: spill drops them, counted on the last tier
            spill(below, victims, vsrc, plan, admission, stats if below else tier.stats)
