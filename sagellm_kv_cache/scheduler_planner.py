"""The scheduler's planner: what allocating a batch of requests in order would do now.

``BatchPlanner.plan`` changes nothing. It walks the requests in order over a
shadow of the device pool (free blocks, the policy's victim order, blocks the
earlier requests of the plan take or evict) and answers, per request: hit
blocks per tier, new device blocks to allocate, blocks to onboard from lower
tiers, device blocks its allocation would evict, and, for a request that must
wait, why (``scheduler_plan.WAIT_REASONS``). Executing the plan in order does
exactly that on the device: the admitted set and the device block counts are
exact. Admission is the pool's own rule (``KVPool.peek_admission`` /
``obtainable_blocks`` / ``pool.admission_reason``), and the victim order is
peeked only as far as the admitted requests need: a plan costs O(its
requests' blocks) plus what the policy's ``peek_victims(k)`` costs for that
``k``, never a walk of the evictable set here. The split of lower-tier hits is
exact too unless a lower tier itself overflows during the plan (a spill
pushing a block the plan counts as a hit further down).
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

    def plan(self, requests: list[SchedRequest]) -> SchedulerPlan:
        """What allocating the (checked) ``requests`` in order would do now; changes
        nothing. The caller holds the offload manager's lock."""
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
        spill_tier = off.tier_names[1] if len(off.tier_names) > 1 else None
        lower_tier_of = off.lower_tier_of
        out: list[RequestPlan] = []
        n_admitted = 0
        token_budget = self.max_num_batched_tokens
        blocked = False
        for req in requests:
            hashes = self.hashes_of(req.tokens, req.block_hashes) or []
            hashes = hashes[: req.num_tokens // bs] if self.enable_prefix_cache else []
            n_total = -(-req.num_tokens // bs)
            per = dict.fromkeys(off.tier_names, 0)
            dev_run = True
            d = 0
            run_ids: list[int] = []
            for h in hashes:
                b = dev_cached.get(h)
                if h in onboarded or (b is not None and h not in evicted):
                    if dev_run:
                        d += 1
                        if b is not None and h not in onboarded:
                            run_ids.append(b)
                    per[dev_name] += 1
                    continue
                dev_run = False
                where = lower_tier_of(h)
                if where is None and h in evicted and spill_tier is not None:
                    hits = off.hit_count(h) + plan_hits[h]
                    if hits >= off.admit_after_hits:
                        where = spill_tier
                if where is None:
                    break
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
                rp.reason = admission_reason(n_new, d, obtainable, bp.num_blocks)
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
            onboarded.update(hashes[d:n_hit])
        return SchedulerPlan(out, free, supply - touched_ev - used - free)
