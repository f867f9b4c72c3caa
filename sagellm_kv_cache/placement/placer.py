"""Fast ``LoadAwareScheduler.placer`` paths (kept apart from ``scheduler.py`` for size).

A simulator places every request on the same devices, in its inner loop; these
closures make the same choices, with the same state changes (counters,
``last_matches``, generator), as ``LoadAwareScheduler.place``:

* ``in_turn``: round-robin, no ``place`` call in between;
* ``by_overlap``: a prefix-aware strategy whose caller keeps the metrics fixed
  (``placer(..., fixed_metrics=True)``) and whose metrics tell no device apart
  (a replay's, as registered): the rules then come down to the longest overlap,
  ties to the fewest placements, which a copy of the placement counts in device
  order answers (re-read whenever a placement went elsewhere or the stats were
  reset).

``tests/test_placement_fast.py`` checks ``placer`` against ``place``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from .metrics import DeviceLoadMetrics

if TYPE_CHECKING:
    from .scheduler import LoadAwareScheduler

__all__ = ["Figures", "by_overlap", "in_turn"]


class Figures(NamedTuple):
    """What the prefix-aware rules read from the candidates' metrics, read once
    (``placer(..., fixed_metrics=True)``: the caller changes no metric while it places)."""

    loads: list[int]  #: running + waiting requests
    loads_alike: bool
    decode: list[int]  #: KV blocks in use (``kv_cost``'s decode blocks)
    decode_alike: bool
    used: list[int]  #: KV tokens in use
    used_alike: bool

    @classmethod
    def of(cls, ms: Sequence[DeviceLoadMetrics]) -> Figures:
        loads = [m.active_requests + m.queue_length for m in ms]
        decode = [m.kv_tokens_used // m.block_size for m in ms]
        used = [m.kv_tokens_used for m in ms]
        n = len(ms)
        return cls(
            loads,
            loads.count(loads[0]) == n,
            decode,
            decode.count(decode[0]) == n,
            used,
            used.count(used[0]) == n,
        )


def in_turn(sched: LoadAwareScheduler, devices: list[Hashable]) -> Callable[..., Hashable]:
    """``placer`` of ``round_robin`` (it reads no metric): the devices in turn, with the
    counters ``place`` keeps."""
    self = sched
    counts = self._placement_decisions
    n = len(devices)

    def place_in_turn(*ignored: object) -> Hashable:  # reads neither request nor device
        j = self._round_robin_index
        self._round_robin_index = j + 1
        device = devices[j % n]
        self.last_matches = None
        self._placement_count += 1
        counts[device] = counts.get(device, 0) + 1
        return device

    return place_in_turn


def by_overlap(
    sched: LoadAwareScheduler,
    kind: str,
    pick: Callable[..., Hashable],
    devices: list[Hashable],
    ms: list[DeviceLoadMetrics],
    fixed: Figures,
) -> Callable[[list[int], int], Hashable]:
    """``placer`` of a prefix-aware strategy whose fixed metrics are alike on every
    device (a replay's, as registered): each rule then comes down to the longest
    overlap, ties (and no overlap) to the fewest placements. The two common cases,
    one longest overlap or all overlaps alike, are decided here by the rule's own
    test; any other goes to the rule, ``pick`` (``LoadAwareScheduler._pick_*``).
    ``kind``: the strategy's value. Returns the choice from a request's overlaps
    (one per device) and its number of blocks, counted as ``place`` counts it."""
    self = sched
    counts = self._placement_decisions
    n = len(devices)
    longest, kv = kind == "longest_prefix", kind == "kv_cost"
    d0 = fixed.decode[0]
    # the devices' placement counts in device order, for the fewest-placements
    # tie-break: current while every placement since it was read went through
    # here (the total and the resets are what they were after the last one)
    tally = [0] * n
    seen_count, seen_resets = -1, -1  # placements and resets when tally was current
    distinct = len(set(devices)) == n

    def choose_by_overlap(matches: list[int], num_blocks: int) -> Hashable:
        best = max(matches)
        ties = matches.count(best)
        j = -1
        if not (longest or kv) and not (num_blocks and best / num_blocks > self.cache_threshold):
            tied = True  # cache_aware, balanced, no match above the threshold: the
            # least KV in use, alike: fewest placements
        elif ties == 1:  # one longest overlap: does the rule take it?
            if longest:
                j = matches.index(best)
            elif kv:
                # cost = w x (blocks - overlap) + d0 falls (weakly) as the overlap
                # grows: the longest is the cheapest alone when one block less costs more
                w = self.overlap_score_weight
                if (self.temperature == 0.0 or n == 1) and (
                    w * (num_blocks - best) + d0 < w * (num_blocks - best + 1) + d0
                ):
                    j = matches.index(best)
            else:
                j = matches.index(best)  # cache_aware, balanced: the longest match
            tied = False
        else:  # all overlaps alike: every cost alike (kv_cost greedy), every load
            # alike (longest_prefix), balanced with the KV in use alike (cache_aware)
            tied = ties == n and (not kv or self.temperature == 0.0 or n == 1)
        nonlocal seen_count, seen_resets
        current = distinct and seen_count == self._placement_count and seen_resets == self._resets
        if tied:
            if not current:
                tally[:] = [counts.get(d, 0) for d in devices]
                current = distinct
            j = tally.index(min(tally))  # the first of the fewest placements
        if j >= 0:
            device = devices[j]
            if current:
                tally[j] += 1
        else:
            device = pick(devices, ms, matches, num_blocks, fixed)
            current = False
        self._placement_count += 1
        counts[device] = counts.get(device, 0) + 1
        if current:
            seen_count, seen_resets = self._placement_count, self._resets
        else:
            seen_count = -1
        return device

    return choose_by_overlap
