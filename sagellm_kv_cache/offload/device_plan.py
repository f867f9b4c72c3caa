"""The device side of a copy plan: what leaves the device pool and what comes onto it.

``DevicePlanner`` turns what the device pool did in a manager call (the
victims its allocation evicted, the blocks a request cached, the hits found
in lower tiers) into steps of the call's ``CopyPlan``::

    device victims -----ReadBlocks----> Buf --spill (chain.py)--> lower tiers
    lower-tier hits ----CopyIn/FilesIn--> the request's fresh device blocks
    victims hit right back --Select + WriteIn--> their fresh device blocks
    newly cached blocks --write-through (chain.py)--> every lower tier (inclusive)
                        \\-- exclusive chain: a lower copy of a recomputed block is dropped

It keeps the device tier's counters (``stats``) and the events the device
pool's hook recorded since the last drain (``victims``, ``newly_cached``).
Nothing here holds the manager's lock: the manager calls it under the lock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING

from ..hooks import PoolHook
from .chain import Admission, spill, write_through
from .jobs import Onboarding
from .plan import CopyIn, CopyPlan, ReadBlocks, Select, WriteIn
from .results import OffloadLookup, OnboardResult
from .staging import Buf
from .tiers import LowerTier, TierStats

if TYPE_CHECKING:
    from ..handle import KVHandle
    from ..pool import KVPool

__all__ = ["DeviceEvents", "DevicePlanner"]


@dataclass(eq=False, slots=True)
class DevicePlanner:
    """Plans the copies between the device pool and the lower tiers.

    Args:
        device: the device pool.
        device_name: its tier name (in lookups and stats).
        tiers: the lower tiers, top down (the manager's list, shared).
        tier: tier name -> ``LowerTier`` (raises on an unknown name).
        admission: the ``admit_after_hits`` rule.
        block_nbytes: bytes of one block (0: metadata-only).
        promote_on_hit: lower-tier hits move up (exclusive chain) or are copied.
        write_through: new cached blocks go down at once.
    """

    device: KVPool
    device_name: str
    tiers: list[LowerTier]
    tier: Callable[[str], LowerTier]
    admission: Admission
    block_nbytes: int
    _: KW_ONLY
    promote_on_hit: bool
    write_through: bool
    #: exclusive chain: a block computed on the device while a lower tier holds it
    #: (two requests computed it; one copy went down) drops the lower copy
    exclusive: bool = field(init=False)
    stats: TierStats = field(init=False)
    #: (block id, hash) the device pool evicted / newly cached since the last drain
    victims: list[tuple[int, Hashable]] = field(init=False, default_factory=list)
    newly_cached: list[tuple[int, Hashable]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.exclusive = self.promote_on_hit and bool(self.tiers)
        self.stats = TierStats(self.device_name, self.device.num_blocks)

    def wants_cached(self, block_hash: Hashable) -> bool:
        """Whether a block the device just cached has something to move below."""
        return self.write_through or (self.exclusive and any(block_hash in t for t in self.tiers))

    def take_victims(self) -> list[tuple[int, Hashable]]:
        out = list(self.victims)
        self.victims.clear()
        return out

    # -- an allocation -----------------------------------------------------------------
    def plan_allocation(
        self,
        plan: CopyPlan,
        rest: CopyPlan,
        handle: KVHandle,
        hashes: list[Hashable],
        look: OffloadLookup,
        d: int,
        victims: list[tuple[int, Hashable]],
        result: OnboardResult,
    ) -> Onboarding | None:
        """The steps of one allocation: into ``plan`` (what the request waits for), stage
        the device victims, copy each onboarded block straight into its device block
        (grouped by source) and spill the victims down; into ``rest``, remove the files
        of blocks promoted out of a disk tier.

        Args:
            d: leading blocks hit on the device (taken by reference, nothing to copy).
            victims: the device blocks the allocation evicted.

        Returns:
            the onboarding of blocks ``d .. look.num_hit_blocks`` (``None``: every
            hit was on the device).
        """
        storage = self.device.storage
        n_hit = look.num_hit_blocks
        evicted = [h for _, h in victims]
        vbuf = None
        if victims and storage is not None:  # staged before anything overwrites them
            vbuf = Buf("device:victims")
            plan.append(ReadBlocks(storage, [b for b, _ in victims], vbuf))
        # sources of positions d .. n_hit: the call's own victims, another device block
        # (a device hit after a lower-tier one), or a lower tier
        victim_pos = {h: i for i, h in enumerate(evicted)}
        from_victims: list[int] = []
        from_device: list[int] = []
        from_tier: dict[str, list[int]] = {}
        sources: list[str | None] = []
        for pos in range(d, n_hit):
            src = look.tiers[pos]
            if src == self.device_name:
                (from_victims if hashes[pos] in victim_pos else from_device).append(pos)
                sources.append(None)
            else:
                from_tier.setdefault(src, []).append(pos)
                sources.append(src)
        ob = Onboarding(handle, hashes[:n_hit], d, n_hit, sources, result) if n_hit > d else None
        ids = handle.block_ids
        if ob is not None and storage is not None:
            if from_device:
                cached = self.device.block_pool.cached
                src_ids = [cached[hashes[p]] for p in from_device]
                dst_ids = [ids[p] for p in from_device]
                plan.append(CopyIn(storage, src_ids, storage, dst_ids, from_device, ob))
            if from_victims and vbuf is not None:
                back = Buf("device:victims|back")
                plan.append(Select(vbuf, [victim_pos[hashes[p]] for p in from_victims], back))
                dst_ids = [ids[p] for p in from_victims]
                plan.append(WriteIn(back, storage, dst_ids, from_victims, ob))
        for name, positions in from_tier.items():
            tier = self.tier(name)
            hs = [hashes[p] for p in positions]
            if ob is not None and storage is not None:
                dst_ids = [ids[p] for p in positions]
                plan.append(tier.onboard_step(hs, storage, dst_ids, positions, ob))
            else:
                tier.count_out(len(hs))
            result.bytes_onboarded[name] += len(hs) * self.block_nbytes
            if self.promote_on_hit:
                tier.remove(hs, rest)
            else:
                tier.refresh(hs)
        self.stats.evicted_blocks += len(victims)
        spilled, sbuf = evicted, vbuf
        if from_victims and self.exclusive:
            # victims this request onboards right back: an exclusive chain moves them up
            # again, it does not also keep them below
            back_set = {hashes[p] for p in from_victims}
            keep = [i for i, h in enumerate(evicted) if h not in back_set]
            spilled = [evicted[i] for i in keep]
            if vbuf is not None:
                sbuf = Buf("device:victims|spilled")
                plan.append(Select(vbuf, keep, sbuf))
        result.blocks_spilled = self.spill(spilled, sbuf, plan)
        onboarded = n_hit - d
        self.stats.blocks_in += onboarded
        self.stats.bytes_in += onboarded * self.block_nbytes
        return ob

    # -- the write path down (chain.py) ------------------------------------------------
    def spill(self, hashes: list[Hashable], src: Buf | None, plan: CopyPlan) -> int:
        """Write-back of blocks leaving the device; returns blocks written below."""
        self.stats.blocks_out += len(hashes)
        self.stats.bytes_out += len(hashes) * self.block_nbytes
        return spill(self.tiers, hashes, src, plan, self.admission, self.stats)

    def write_down(self, pairs: list[tuple[int, Hashable]], plan: CopyPlan) -> None:
        """Write-through: copy cached device blocks into every lower tier (inclusive)."""
        cached = self.device.block_pool.cached
        pairs = [(b, h) for b, h in pairs if cached.get(h) == b]
        if not pairs or not self.tiers:
            return
        ids = [b for b, _ in pairs]
        src = None
        if self.device.storage is not None:
            src = Buf("device:write-through")
            plan.append(ReadBlocks(self.device.storage, ids, src))
        self.stats.blocks_out += len(ids)
        self.stats.bytes_out += len(ids) * self.block_nbytes
        hashes = [h for _, h in pairs]
        write_through(self.tiers, hashes, src, plan, self.admission, self.stats)

    def drain(self, plan: CopyPlan) -> None:
        """Plan what the device hook recorded: evictions spill, new cached blocks go down."""
        if self.victims:
            victims = self.take_victims()
            self.stats.evicted_blocks += len(victims)
            src = None
            if self.device.storage is not None:
                src = Buf("device:evicted")
                plan.append(ReadBlocks(self.device.storage, [b for b, _ in victims], src))
            self.spill([h for _, h in victims], src, plan)
        if self.newly_cached:
            pairs = list(self.newly_cached)
            self.newly_cached.clear()
            if self.exclusive:
                for tier in self.tiers:
                    present = [h for _, h in pairs if h in tier]
                    if present:
                        tier.remove(present, plan)
            elif not self.admission.admit_after_hits:
                self.write_down(pairs, plan)


class DeviceEvents(PoolHook):
    """The device pool's hook: records evictions (write-back) and new cached blocks
    (write-through) for the planner.

    A manager call drains the records into its plan (``DevicePlanner.drain``); an event
    from outside any call (``in_call()`` false) is planned and run at once (``flush()``),
    before the evicted block can be reused.
    """

    def __init__(
        self, planner: DevicePlanner, in_call: Callable[[], bool], flush: Callable[[], None]
    ) -> None:
        self.planner = planner
        self.in_call = in_call
        self.flush = flush

    def on_evict(self, block_id, block_hash, reason, timestamp) -> None:
        self.planner.victims.append((block_id, block_hash))
        if not self.in_call():
            self.flush()

    def on_block_cached(self, block_id, block_hash, parent_hash, timestamp) -> None:
        if self.planner.wants_cached(block_hash):
            self.planner.newly_cached.append((block_id, block_hash))
            if not self.in_call():
                self.flush()
