"""The typed copy plan of one manager call: steps over buffer handles, run in order.

A manager call decides everything under its lock (which blocks go where) and
records the bytes to move as a ``CopyPlan``: a list of small step
dataclasses, each naming its source and destination (a ``KVStorage`` and
block ids, a tier and its slots or files, or a ``Buf`` that an earlier step
fills). The copy worker runs the steps in order, without the lock::

    allocate(): device victims v1 v2, hits h3 (cpu) h4 (disk), v1 admitted below
      ReadBlocks(device, [v1, v2])        -> Buf victims      (before anything overwrites them)
      CopyIn(cpu storage, [s3], device, [d3])                 (h3 straight into its new block)
      FilesIn(disk, [h4], device, [d4])                       (h4's file read into its block)
      DeleteFiles(disk, [h4])                                 (promoted: it left the disk tier)
      Select(Buf victims, [0])            -> Buf admitted
      WriteSlots(cpu, [s7], [v1], Buf admitted)               (the spill)

Onboarded blocks are copied straight into their device blocks (``CopyIn``:
contiguous runs of blocks in one ``copy_`` each; ``FilesIn``: each file read by
``preadv`` straight into the block's own memory, in runs hashed as they land), then
marked verified for the
``Onboarding`` (``jobs.py``). Steps fail per block and never abort the plan:
a failed block is reported to the plan (``_report``) and a step whose input
``Buf`` is empty treats its blocks as failed.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import KVCacheError
from .staging import (
    Buf,
    as_block_payloads,
    as_tensor,
    block_views,
    delete_quietly,
    not_staged,
    present_blocks,
    typed_error,
)

if TYPE_CHECKING:
    from ..storage import KVStorage
    from .jobs import Onboarding
    from .tiers import LowerTier

__all__ = [
    "Buf",
    "Concat",
    "CopyIn",
    "CopyPlan",
    "DeleteFiles",
    "FilesIn",
    "ReadBlocks",
    "ReadFiles",
    "Select",
    "Step",
    "WriteFiles",
    "WriteIn",
    "WriteSlots",
]


class Step(Protocol):
    def run(self, plan: CopyPlan | None) -> None: ...


class CopyPlan:
    """The steps of one manager call, in order, and what running them taught.

    Attributes:
        steps: what the worker runs, in order.
        drops: ``(tier, hash, generation, kind, error)`` of lower-tier copies
            that failed to read (``kind="read"``), write (``"write"``) or be
            deleted (``"delete"``).
        errors: typed errors of the blocks the request itself asked for.
        onboarding: the allocation's onboarded blocks, if any.
    """

    __slots__ = ("drops", "errors", "onboarding", "steps")

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.drops: list[tuple[LowerTier, Hashable, int | None, str, BaseException]] = []
        self.errors: list[BaseException] = []
        self.onboarding: Onboarding | None = None

    def append(self, step: Step | None) -> None:
        if step is not None:
            self.steps.append(step)

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def run(self) -> None:
        """Run every step (a failing step fails its own blocks, never the rest)."""
        for step in self.steps:
            try:
                step.run(self)
            except Exception as exc:  # its blocks count as failed downstream
                self.errors.append(exc)
        # the staged buffers die here, in the worker, before the future resolves: freeing
        # them later (with the GIL) would stall whoever takes the manager's lock next
        self.steps = []
        if self.onboarding is not None:
            self.onboarding.finish(self.errors)


def _report(
    plan: CopyPlan | None,
    tier: LowerTier,
    key: Hashable,
    gen: int | None,
    kind: str,
    exc: BaseException,
    requested: bool = False,
) -> None:
    """A per-block failure goes to the plan (its ``drops``, and its ``errors`` when the
    request itself asked for the block); without a plan (a debugging read) it propagates."""
    if plan is None:
        raise exc
    exc = typed_error(exc, key)
    plan.drops.append((tier, key, gen, kind, exc))
    if requested:
        plan.errors.append(exc)


# -- staging: bytes into buffers ---------------------------------------------------------
@dataclass(slots=True)
class ReadBlocks:
    """Blocks ``ids`` of a storage (device or host tier) into ``out``."""

    storage: KVStorage
    ids: list[int]
    out: Buf

    def run(self, plan: CopyPlan | None) -> None:
        self.out.data = self.storage.read_blocks(self.ids)


@dataclass(slots=True)
class ReadFiles:
    """The files of ``keys`` of a disk tier into ``out`` (a failed one: ``None``, file removed)."""

    tier: LowerTier
    keys: list[Hashable]
    gens: list[int | None]
    out: Buf
    requested: bool = False

    def run(self, plan: CopyPlan | None) -> None:
        disk = self.tier.disk
        assert disk is not None
        out: list[Any] = []
        for k, gen in zip(self.keys, self.gens):
            try:
                out.append(disk.read(k))
            except Exception as exc:
                if plan is None:
                    raise
                out.append(None)
                delete_quietly(disk, k)  # a bad copy is dropped, not retried forever
                _report(plan, self.tier, k, gen, "read", exc, self.requested)
        self.out.data = out


@dataclass(slots=True)
class Select:
    """``src`` restricted to blocks ``index`` (in that order) into ``out``."""

    src: Buf
    index: list[int]
    out: Buf

    def run(self, plan: CopyPlan | None) -> None:
        data = self.src.data
        if data is None:
            return
        if isinstance(data, list):
            self.out.data = [data[i] for i in self.index]
            return
        import torch

        idx = torch.as_tensor(self.index, dtype=torch.long, device=data.device)
        self.out.data = data.index_select(2, idx)


@dataclass(slots=True)
class Concat:
    """``a`` then ``b`` into ``out`` (empty when either is)."""

    a: Buf
    b: Buf
    out: Buf

    def run(self, plan: CopyPlan | None) -> None:
        a, b = self.a.data, self.b.data
        if a is None or b is None:
            return
        if isinstance(a, list) or isinstance(b, list):
            self.out.data = list(as_block_payloads(a)) + list(as_block_payloads(b))
            return
        import torch

        self.out.data = torch.cat([a, b.to(a.device)], dim=2)


# -- buffers into lower tiers --------------------------------------------------------------
@dataclass(slots=True)
class WriteSlots:
    """Staged ``src`` into slots of a host tier (a block not staged is not stored)."""

    tier: LowerTier
    slots: list[int]
    keys: list[Hashable]
    gens: list[int | None]
    src: Buf

    def run(self, plan: CopyPlan | None) -> None:
        tier, data, n = self.tier, self.src.data, len(self.slots)
        storage = tier.storage
        assert storage is not None
        good = present_blocks(data, n)
        try:
            if len(good) == n:
                storage.write_blocks(
                    self.slots, as_tensor(data, tier.block_dims, tier.storage_dtype)
                )
            elif good:
                part = [as_block_payloads(data)[i] for i in good]
                storage.write_blocks(
                    [self.slots[i] for i in good],
                    as_tensor(part, tier.block_dims, tier.storage_dtype),
                )
        except Exception as exc:
            for i in good:
                _report(plan, tier, self.keys[i], self.gens[i], "write", exc)
        kept = set(good)
        for i in range(n):
            if i not in kept:
                _report(plan, tier, self.keys[i], self.gens[i], "write", not_staged(self.keys[i]))


@dataclass(slots=True)
class WriteFiles:
    """Staged ``src`` into one file per block of a disk tier."""

    tier: LowerTier
    keys: list[Hashable]
    gens: list[int | None]
    src: Buf

    def run(self, plan: CopyPlan | None) -> None:
        disk = self.tier.disk
        assert disk is not None
        data = self.src.data
        payloads = as_block_payloads(data) if data is not None else [None] * len(self.keys)
        for k, gen, payload in zip(self.keys, self.gens, payloads):
            if payload is None:
                _report(plan, self.tier, k, gen, "write", not_staged(k))
                continue
            try:
                disk.write(k, payload)
            except Exception as exc:
                _report(plan, self.tier, k, gen, "write", exc)


@dataclass(slots=True)
class DeleteFiles:
    """Remove the files of blocks that left a disk tier."""

    tier: LowerTier
    keys: list[Hashable]

    def run(self, plan: CopyPlan | None) -> None:
        disk = self.tier.disk
        assert disk is not None
        for k in self.keys:
            try:
                disk.delete(k)
            except KVCacheError as exc:
                _report(plan, self.tier, k, None, "delete", exc)


# -- onboarding: straight into the device blocks ---------------------------------------------
@dataclass(slots=True)
class CopyIn:
    """Blocks ``src_ids`` of a storage into device blocks ``dst_ids`` (contiguous runs in
    one copy each); their ``positions`` are then verified for ``onboarding``."""

    src: KVStorage
    src_ids: list[int]
    dst: KVStorage
    dst_ids: list[int]
    positions: list[int]
    onboarding: Onboarding

    def run(self, plan: CopyPlan | None) -> None:
        self.dst.copy_blocks_from(self.src, self.src_ids, self.dst_ids)
        self.onboarding.verified.update(self.positions)


@dataclass(slots=True)
class FilesIn:
    """The files of ``keys`` of a disk tier read straight into device blocks ``dst_ids``
    (``DiskBlockStore.read_into``); a block that fails stays unverified, its file removed."""

    tier: LowerTier
    keys: list[Hashable]
    gens: list[int | None]
    dst: KVStorage
    dst_ids: list[int]
    positions: list[int]
    onboarding: Onboarding

    def run(self, plan: CopyPlan | None) -> None:
        disk = self.tier.disk
        assert disk is not None
        dst = self.dst
        bounce = dst.bounce_block() if dst.device != "cpu" else None
        if bounce is not None:  # read into one pinned CPU block, then copy it up
            bounce_bufs = [memoryview(c) for c in dst.chunks_of(bounce)]
        else:
            views = block_views(dst)
        verified = self.onboarding.verified
        for k, gen, b, pos in zip(self.keys, self.gens, self.dst_ids, self.positions):
            try:
                disk.read_into(k, bounce_bufs if bounce is not None else views(b))
                if bounce is not None:
                    dst.kv[:, :, b : b + 1].copy_(bounce)
            except Exception as exc:
                delete_quietly(disk, k)  # a bad copy is dropped, not retried forever
                _report(plan, self.tier, k, gen, "read", exc, requested=True)
                continue
            verified.add(pos)


@dataclass(slots=True)
class WriteIn:
    """Staged ``src`` into device blocks ``dst_ids`` (blocks onboarded back from the
    call's own device victims); positions whose bytes were staged are verified."""

    src: Buf
    dst: KVStorage
    dst_ids: list[int]
    positions: list[int]
    onboarding: Onboarding

    def run(self, plan: CopyPlan | None) -> None:
        data = self.src.data
        if data is None:
            return  # the source read failed: these blocks stay unverified
        good = present_blocks(data, len(self.dst_ids))
        if not good:
            return
        if isinstance(data, list):
            data = [data[i] for i in good]
        dst = self.dst
        block_dims = (*dst.kv.shape[:2], 1, *dst.kv.shape[3:])
        dst.write_blocks(
            [self.dst_ids[i] for i in good], as_tensor(data, block_dims, dst.storage_dtype)
        )
        self.onboarding.verified.update(self.positions[i] for i in good)
