"""The scheduler's planner: what allocating a batch of requests in order would do now.

``BatchPlanner.plan`` changes nothing. It walks the requests in order over a
shadow of the device pool (free blocks, the policy's victim order, blocks the
earlier requests of the plan take or evict) and of the lower tiers, and
answers, per request: hit blocks per tier, new device blocks to allocate,
blocks to onboard from lower tiers, device blocks its allocation would evict,
and, for a request that must wait, why (``scheduler_plan.WAIT_REASONS``).
Admission is the pool's own rule (``KVPool.peek_admission`` /
``obtainable_blocks`` / ``pool.admission_reason``), and the victim order is
peeked only as far as the admitted requests need: a plan costs O(its
requests' blocks) plus what the policy's ``peek_victims(k)`` costs for that
``k``, never a walk of the evictable set here.

Executing the plan (``SchedulerBridge.schedule``) does exactly what it says
because the batch *holds* (``KVOffloadManager.hold``) every block of its
requests that a lower tier has, and every such block an earlier request of
the batch spills: a spill into a full tier evicts other blocks, never one a
later request of the batch counts as a hit. What the plan still needs to
know of a lower tier is then only its room for a spill (capacity minus held
blocks), which ``_LowerShadow`` tracks. A device hit that follows a
lower-tier hit is copied into the request's own block, which the device
cache does not take: the hash stays with its old, evictable block, and the
plan sees it evicted (and spilled) if a later victim is that block.

Where it is an estimate (``BatchPlanner.exact`` False): under a device
policy without a stable victim order (``EvictionPolicy.stable_victim_order``:
ARC) the batch's own hits and inserts reorder the victims; in a lower tier
that evicts only leaves (``leaf:*``) a held block keeps its ancestors too, so
a spill finds less room than the plan counts; with two or more lower tiers
the shadow assumes a spill overflowing the first fits the second, which a
second tier full of held blocks, or of the first tier's other victims, does
not give. On inclusive chains the shadow also assumes that a device victim
whose copy the first lower tier held before the plan still has it; the
randomized test over exclusive, inclusive, write-through and
admission-filtered one-tier chains has found no case where that differs.
Executing an estimate never fails for it: a request that no longer fits
waits (``SchedulerBridge.schedule``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import KW_ONLY, dataclass
from typing import Any

from .offload import KVOffloadManager
from .pool import admission_reason
from .scheduler_plan import RequestPlan, SchedRequest, SchedulerPlan

__all__ = ["BatchPlanner"]


class _LowerShadow:
    """The lower tiers as a plan sees them: where each block of the batch (``wanted``)
    is now, and how many of them the first lower tier holds (room for spills)."""

    __slots__ = ("exclusive", "first", "held0", "moved", "off", "second", "wanted")

    def __init__(self, off: KVOffloadManager, wanted: set[Hashable]) -> None:
        self.off = off
        self.wanted = wanted
        self.first = off.tiers[0]
        self.second = off.tiers[1].name if len(off.tiers) > 1 else None
        self.exclusive = off.promote_on_hit
        first = self.first
        self.held0 = sum(1 for h in wanted if h in first)  # the batch holds these
        self.moved: dict[Hashable, str | None] = {}  # block -> its first lower tier now

    def where(self, h: Hashable) -> str | None:
        moved = self.moved
        return moved[h] if h in moved else self.off.lower_tier_of(h)

    def admit(
        self,
        lower_hits: list[tuple[Hashable, str]],
        dev_later: list[Hashable],
        evict_hashes: list[Hashable],
        hits: Callable[[Hashable], int],
    ) -> None:
        """An admitted request: its lower-tier hits are promoted (exclusive chain), then
        its device victims spill into the first lower tier (``chain.spill``)."""
        moved = self.moved
        first = self.first.name
        spilled = evict_hashes
        if self.exclusive:
            for h, t in lower_hits:
                moved[h] = None
                if t == first:
                    self.held0 -= 1
            if dev_later:  # its own victims it onboards right back are not spilled
                back = set(dev_later).intersection(evict_hashes)
                spilled = [h for h in evict_hashes if h not in back]
        n = self.off.admit_after_hits
        if n:
            spilled = [h for h in spilled if hits(h) >= n]
        if not spilled:
            return
        wanted = self.wanted
        tier0 = self.first
        present_free = 0
        new: list[Hashable] = []
        for h in spilled:
            if (moved[h] == first) if h in moved else (h in tier0):
                present_free += h not in wanted
            else:
                new.append(h)
        # the oldest new blocks beyond the room not held fall through (tiers.insert)
        over = len(new) - (tier0.num_blocks - self.held0 - present_free)
        for i, h in enumerate(new):
            if h in wanted:
                if i < over:
                    moved[h] = self.second
                else:
                    moved[h] = first
                    self.held0 += 1


@dataclass(slots=True)
class BatchPlanner:
    """Plans batches over a ``KVOffloadManager``'s device pool and tiers.

    Args:
        offload: the tiered cache.
        hashes_of: ``(tokens, block_hashes) -> block hashes or None`` (the facade's).
        enable_prefix_cache: count prefix hits (False: every block is new).
        max_num_seqs / max_num_batched_tokens: per-plan limits (None: none).
        fcfs: stop admitting at the first request that must wait.
    """

    offload: KVOffloadManager
    hashes_of: Callable[[Any, Any], list | None]
    _: KW_ONLY
    enable_prefix_cache: bool
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    fcfs: bool

    @property
    def exact(self) -> bool:
        """Whether executing a plan does exactly what it says (module docstring)."""
        off = self.offload
        if not off.device.block_pool.policy.stable_victim_order or len(off.tiers) > 1:
            return False
        return not any(t.pool.policy_may_refuse for t in off.tiers)

    def plan(self, requests: list[SchedRequest]) -> SchedulerPlan:
        """What allocating the (checked) ``requests`` in order would do now; changes
        nothing. The caller holds the offload manager's lock."""
        return self.plan_batch(requests)[0]

    def plan_batch(self, requests: list[SchedRequest]) -> tuple[SchedulerPlan, set[Hashable]]:
        """``plan``, and the blocks of the batch the execution must hold in the lower
        tiers (``KVOffloadManager.hold``) for the plan to be exact."""
        off = self.offload
        pool = off.device
        bp = pool.block_pool
        bs = pool.block_size
        dev_name = off.device_name
        dev_cached = bp.cached if self.enable_prefix_cache else {}
        free = bp.num_free
        # the pool's own admission queries: free + evictable now, and what a hit run takes
        supply = pool.obtainable_blocks()
        victims: list[int] = []  # the policy's victim order, peeked only as far as needed
        cursor = 0
        touched: set[int] = set()  # device blocks the admitted requests' hits take
        touched_ev = 0  # how many of those were evictable (supply they take)
        used = 0  # new blocks the admitted requests take: free ones, then victims
        evicted: dict[Hashable, None] = {}  # hashes the plan evicts from the device
        onboarded: set[Hashable] = set()  # hashes the plan brings onto the device
        plan_hits: Counter = Counter()
        out: list[RequestPlan] = []
        n_admitted = 0
        token_budget = self.max_num_batched_tokens
        blocked = False
        all_hashes = []
        for req in requests:
            hashes = self.hashes_of(req.tokens, req.block_hashes) or []
            all_hashes.append(hashes[: req.num_tokens // bs] if self.enable_prefix_cache else [])
        wanted: set[Hashable] = set()
        shadow = None
        if off.tiers and self.enable_prefix_cache:
            for hashes in all_hashes:
                wanted.update(hashes)
            shadow = _LowerShadow(off, wanted)
        for req, hashes in zip(requests, all_hashes):
            n_total = -(-req.num_tokens // bs)
            per = dict.fromkeys(off.tier_names, 0)
            dev_run = True
            d = 0
            run_ids: list[int] = []
            lower_hits: list[tuple[Hashable, str]] = []
            dev_later: list[Hashable] = []  # device hits after a lower-tier one
            stay: list[Hashable] = []  # those of them the request copies, not takes
            for h in hashes:
                b = dev_cached.get(h)
                if h in onboarded or (b is not None and h not in evicted):
                    if dev_run:
                        d += 1
                        if b is not None and h not in onboarded:
                            run_ids.append(b)
                    else:
                        dev_later.append(h)
                        if h not in onboarded:  # stays in its old block, evictable
                            stay.append(h)
                    per[dev_name] += 1
                    continue
                dev_run = False
                where = shadow.where(h) if shadow is not None else None
                if where is None:
                    break
                lower_hits.append((h, where))
                per[where] += 1
            rp = RequestPlan(req.request_id, req.num_tokens, n_total, per, bs)
            out.append(rp)
            n_hit = sum(per.values())
            n_new = n_total - d
            rp.blocks_to_allocate = n_new  # what it needs, admitted or not
            rp.blocks_to_onboard = n_hit - d
            rest = [b for b in run_ids if b not in touched] if touched else run_ids
            n_ev = supply - pool.obtainable_blocks(rest) if rest else 0
            if blocked:
                rp.reason = "blocked"
            elif n_admitted == 0:  # the shadow is the pool itself: ask it (its rule, once)
                rp.reason = pool.peek_admission(n_new, run_ids)
            else:
                obtainable = supply - n_ev - touched_ev - used
                # a block the request names twice is one block of the pool (its rule too)
                size = d if n_new + d <= bp.num_blocks else len(set(hashes[:d]))
                rp.reason = admission_reason(n_new, size, obtainable, bp.num_blocks)
            if rp.reason is None:
                if self.max_num_seqs is not None and n_admitted >= self.max_num_seqs:
                    rp.reason = "max_num_seqs"
                elif token_budget is not None and rp.num_uncached_tokens > token_budget:
                    rp.reason = "token_budget"
            from_free = min(free, n_new)
            need = n_new - from_free
            c = cursor
            if rp.reason is None and need:
                # victims in policy order, skipping blocks the plan's hits take; at most
                # touched_ev + n_ev of the entries from the cursor on are such blocks
                want = cursor + need + touched_ev + n_ev
                if len(victims) < want:
                    victims = pool.policy.peek_victims(max(want, 2 * len(victims)))
                mine = set(rest) if n_ev else ()
                while len(rp.evict_hashes) < need and c < len(victims):
                    b = victims[c]
                    c += 1
                    if b not in touched and b not in mine:
                        rp.evict_hashes.append(bp.block_hashes[b])
                if len(rp.evict_hashes) < need:  # the policy refuses some evictable blocks
                    rp.evict_hashes.clear()
                    rp.reason = "no_victims"
            if rp.reason is not None:
                blocked = blocked or self.fcfs
                continue
            # admitted: take its hits, then free blocks, then the victims found above
            rp.admitted = True
            n_admitted += 1
            if token_budget is not None:
                token_budget -= rp.num_uncached_tokens
            touched.update(rest)
            touched_ev += n_ev
            used += n_new
            free -= from_free
            cursor = c
            evicted.update(dict.fromkeys(rp.evict_hashes))
            rp.blocks_to_evict = len(rp.evict_hashes)
            for h in hashes[:n_hit]:
                plan_hits[h] += 1
            # a device hit after a lower-tier one is copied into the request's own block,
            # which the cache does not take (the hash stays with the old, evictable block)
            # unless the request evicted the old block itself
            keep = set(stay).difference(rp.evict_hashes) if stay else ()
            onboarded.update(h for h in hashes[d:n_hit] if h not in keep)
            if shadow is not None:
                shadow.admit(
                    lower_hits,
                    dev_later,
                    rp.evict_hashes,
                    lambda h: off.hit_count(h) + plan_hits[h],
                )
        return SchedulerPlan(out, free, supply - touched_ev - used - free), wanted
