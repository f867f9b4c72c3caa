"""Lower tiers of the offload chain: a block pool for the bookkeeping plus a byte backend.

::

    tier      bookkeeping (capacity, eviction order)     bytes
    ------    --------------------------------------     ----------------------------------
    host      BlockPool(num_blocks, policy)               KVStorage on CPU (pinned with CUDA)
    disk      BlockPool(num_blocks, policy)               DiskBlockStore: one file per block
    (any)     BlockPool                                   none (metadata-only: trace replay)

A slot of a lower tier is a block id of its ``BlockPool``. A resident block is
*cached and evictable* there (ref count 0), so the pool's policy orders it;
``insert`` takes slots (free first, then the policy's victims), registers the
new hashes and releases them so that the first inserted block is the least
recent. The victims are returned with a snapshot of their bytes so the
manager can spill them one tier further down.

Everything here is synchronous and not thread-safe; the manager serialises
calls and moves the bytes in its worker (the steps of a ``CopyPlan``,
``plan.py``). The steps fail per block: a disk block that cannot be read (missing
file, bad checksum, I/O error) stages ``None`` and has its file removed; a
block that cannot be written (disk full, its bytes never staged) is not
stored; both are reported to the plan (``CopyPlan.failed``) with the generation the
tier stamped on that admission, and the manager drops them at settle
(``drop_if_current``, see ``jobs.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..block_pool import BlockPool
from ..block_pool_room import room as block_room
from ..errors import KVConfigError
from ..hooks import PoolHook
from .plan import (
    Concat,
    CopyIn,
    DeleteFiles,
    FilesIn,
    ReadBlocks,
    ReadFiles,
    Select,
    Step,
    WriteFiles,
    WriteSlots,
)
from .staging import Buf

if TYPE_CHECKING:
    from ..storage import KVStorage
    from .jobs import Onboarding

__all__ = ["LowerTier", "TierConfig", "TierKind", "TierStats"]


class TierKind(enum.StrEnum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass(slots=True)
class TierConfig:
    """One lower tier of the chain.

    Args:
        name: label in stats and lookups (``"cpu"``, ``"disk"``...).
        num_blocks: capacity in blocks.
        kind: ``"host"`` (CPU memory) or ``"disk"`` (files in ``directory``).
        eviction_policy: policy name of this tier's pool.
        directory: folder of a disk tier (``None``: metadata-only disk tier).
        fsync: sync each disk block before it becomes visible.
        verify_on_open: check every disk file's checksum on open.
    """

    name: str
    num_blocks: int
    kind: str = TierKind.HOST.value
    eviction_policy: str = "lru"
    directory: str | None = None
    fsync: bool = True
    verify_on_open: bool = True

    def __post_init__(self) -> None:
        try:
            self.kind = TierKind(str(self.kind)).value
        except ValueError:
            raise KVConfigError(f"unknown tier kind {self.kind!r}; use 'host' or 'disk'") from None
        if self.kind == TierKind.DEVICE.value:
            raise KVConfigError("the device tier is the manager's KVPool, not a TierConfig")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int):
            raise KVConfigError(f"tier {self.name}: num_blocks must be an int")
        if self.num_blocks < 1:
            raise KVConfigError(f"tier {self.name}: num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(slots=True)
class TierStats:
    """Counters of one tier, the device included (monotonic until ``reset``).

    Traffic (``*_in``, ``*_out``) counts what was planned, when the call decided
    the move; a copy that later fails shows in ``read_errors`` / ``write_errors``.
    """

    #: the tier's name (``TierConfig.name``; the device's ``device_name``)
    name: str
    #: blocks the tier holds when full
    capacity_blocks: int
    #: blocks a lookup found in this tier (the first tier holding them)
    hit_blocks: int = 0
    #: blocks written into this tier (spill, write-through, onboarding into the device)
    blocks_in: int = 0
    #: blocks read out of it (onboarding to the device, spill further down)
    blocks_out: int = 0
    #: bytes of ``blocks_in`` (``blocks_in`` times the block size in bytes)
    bytes_in: int = 0
    #: bytes of ``blocks_out``
    bytes_out: int = 0
    #: blocks this tier evicted to make room
    evicted_blocks: int = 0
    #: evicted blocks not admitted below (or with no tier below): gone from every tier
    dropped_blocks: int = 0
    #: blocks whose bytes could not be read (missing file, bad checksum, I/O error):
    #: dropped, a miss from then on
    read_errors: int = 0
    #: blocks not stored because their write failed (disk full...)
    write_errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _VictimRecorder(PoolHook):
    """Collects the (slot, hash) pairs a tier's pool evicts for capacity."""

    __slots__ = ("victims",)

    def __init__(self) -> None:
        self.victims: list[tuple[int, Hashable]] = []

    def on_evict(self, block_id, block_hash, reason, timestamp) -> None:
        if reason == "capacity":
            self.victims.append((block_id, block_hash))


class LowerTier:
    """A host or disk tier: bookkeeping in a ``BlockPool``, bytes in a backend.

    Args:
        config: the tier's ``TierConfig``.
        block_size: tokens per block (the device pool's).
        storage_factory: ``num_blocks -> KVStorage`` for a host tier with data,
            ``None`` for metadata-only.
        block_nbytes / geometry: payload size and geometry string of one block
            (disk tier with data).
        block_dims: shape of one block as ``read_blocks`` returns it, with the
            block dimension at index 2 of length 1 (for disk reads).
        storage_dtype: torch dtype of the staged tensors (for disk reads).
        clock: the pool clock.
    """

    def __init__(
        self,
        config: TierConfig,
        block_size: int,
        *,
        storage_factory: Callable[[int], Any] | None = None,
        block_nbytes: int = 0,
        geometry: str = "",
        block_dims: tuple[int, ...] = (),
        storage_dtype: Any = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.kind = config.kind
        self.num_blocks = config.num_blocks
        self.block_size = block_size
        self.pool = BlockPool(config.num_blocks, block_size, config.eviction_policy, clock=clock)
        self._recorder = _VictimRecorder()
        self.pool.hooks.append(self._recorder)
        self.stats = TierStats(config.name, config.num_blocks)
        self.block_nbytes = block_nbytes
        self.block_dims = block_dims
        self.storage_dtype = storage_dtype
        self.storage = None
        self.disk = None
        #: hash -> stamp of its current admission (see ``drop_if_current``)
        self._gen: dict[Hashable, int] = {}
        #: hash -> slot of blocks held for a scheduled batch (``hold``)
        self._held: dict[Hashable, int] = {}
        self._next_gen = 0
        if config.kind == TierKind.HOST.value and storage_factory is not None:
            self.storage = storage_factory(config.num_blocks)
        elif config.kind == TierKind.DISK.value and config.directory is not None:
            if not block_nbytes:
                raise KVConfigError(f"disk tier {config.name} with a directory needs a model shape")
            from .disk import DiskBlockStore

            self.disk = DiskBlockStore(
                config.directory,
                geometry,
                block_nbytes,
                fsync=config.fsync,
                verify_on_open=config.verify_on_open,
            )
            self._adopt(self.disk.scan())

    @property
    def has_data(self) -> bool:
        return self.storage is not None or self.disk is not None

    def _adopt(self, keys: list[Hashable]) -> None:
        """Register blocks found on disk (oldest first), keeping the newest that fit."""
        if len(keys) > self.num_blocks:
            assert self.disk is not None  # only a disk tier adopts files
            for k in keys[: len(keys) - self.num_blocks]:
                self.disk.delete(k)
            keys = keys[len(keys) - self.num_blocks :]
        if keys:
            slots = self.pool.allocate(len(keys))
            self.pool.cache_blocks(slots, keys)
            self.pool.release(slots[::-1])
            self._stamp(keys)

    def _stamp(self, keys: Sequence[Hashable]) -> None:
        if not self.has_data:
            return  # nothing can fail to read or write: no stamps needed
        gen = self._gen
        n = self._next_gen
        for k in keys:
            n += 1
            gen[k] = n
        self._next_gen = n

    def drop_if_current(self, block_hash: Hashable, gen: int | None) -> bool:
        """Drop ``block_hash`` if the tier still holds the admission stamped ``gen``.

        Called at settle for a copy that failed to read or write; the file (if
        any) is already gone. Returns whether it was dropped.
        """
        if gen is None or self._gen.get(block_hash) != gen:
            return False
        del self._gen[block_hash]
        self._unhold([block_hash])
        self.pool.uncache(self.pool.cached[block_hash], reason="failed")
        return True

    # -- queries -------------------------------------------------------------
    def slot_of(self, block_hash: Hashable) -> int | None:
        return self.pool.cached.get(block_hash)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self.pool.cached

    @property
    def num_resident(self) -> int:
        return self.pool.num_cached

    def refresh(self, block_hashes: Sequence[Hashable]) -> None:
        """Mark resident blocks as just used (first given = least recent)."""
        slots = [self.pool.cached[h] for h in block_hashes]
        if slots:
            self.pool.touch(slots)
            self.pool.release(slots[::-1])

    # -- holds (a scheduled batch keeps the blocks it will onboard) ----------------------
    def hold(self, block_hashes: Collection[Hashable]) -> None:
        """Keep the resident ones of ``block_hashes`` from being evicted until
        ``release_holds`` (or until promoted out): a spill into a full tier then
        evicts other blocks. Held blocks take no part in the eviction order."""
        cached = self.pool.cached
        held = self._held
        slots = []
        for h in block_hashes:
            b = cached.get(h)
            if b is not None and h not in held:
                held[h] = b
                slots.append(b)
        if slots:
            self.pool.pin(slots)

    @property
    def num_held(self) -> int:
        return len(self._held)

    def release_holds(self) -> None:
        """End every hold: the blocks are evictable again (as just used)."""
        if self._held:
            slots = list(self._held.values())
            self._held.clear()
            self.pool.unpin(slots)

    def _unhold(self, block_hashes: Sequence[Hashable]) -> None:
        held = self._held
        slots = [held.pop(h) for h in block_hashes if h in held]
        if slots:
            self.pool.unpin(slots)

    # -- bytes (steps of a copy plan, see ``plan.py``) ---------------------------------
    def count_out(self, n: int) -> None:
        """Traffic out of this tier (what was planned, failed reads included)."""
        self.stats.blocks_out += n
        self.stats.bytes_out += n * self.block_nbytes

    def gens_of(self, block_hashes: Sequence[Hashable]) -> list[int | None]:
        """The admission stamps of resident blocks (see ``drop_if_current``)."""
        gen = self._gen
        return [gen.get(k) for k in block_hashes]

    def read_step(
        self,
        block_hashes: Sequence[Hashable],
        out: Buf,
        slots: Sequence[int] | None = None,
        *,
        requested: bool = False,
    ) -> Step | None:
        """A step staging the bytes of blocks into ``out`` (slots resolved now).

        ``slots`` names them for blocks whose hash was just dropped (victims).
        A disk block that cannot be read stages ``None``, loses its file and is
        reported to the plan (``requested``: as the request's own error).
        """
        n = len(block_hashes)
        self.count_out(n)
        if not self.has_data or not n:
            return None
        if self.storage is not None:
            ids = list(slots) if slots is not None else [self.pool.cached[h] for h in block_hashes]
            return ReadBlocks(self.storage, ids, out)
        keys = list(block_hashes)
        gens: list[int | None] = self.gens_of(keys) if slots is None else [None] * n
        return ReadFiles(self, keys, gens, out, requested)

    def onboard_step(
        self,
        block_hashes: Sequence[Hashable],
        dst: KVStorage,
        dst_ids: list[int],
        positions: list[int],
        onboarding: Onboarding,
    ) -> Step | None:
        """A step copying resident blocks straight into device blocks ``dst_ids`` (no
        staging), marking ``positions`` verified for ``onboarding`` as they land."""
        self.count_out(len(block_hashes))
        if not self.has_data or not block_hashes:
            return None
        keys = list(block_hashes)
        if self.storage is not None:
            slots = [self.pool.cached[h] for h in keys]
            return CopyIn(self.storage, slots, dst, dst_ids, positions, onboarding)
        return FilesIn(self, keys, self.gens_of(keys), dst, dst_ids, positions, onboarding)

    def write_step(self, slots: Sequence[int], keys: Sequence[Hashable], src: Buf) -> Step | None:
        """A step writing the staged ``src`` into ``slots`` (hashes ``keys``); a block whose
        bytes were not staged or whose write fails is reported as not stored."""
        n = len(slots)
        self.stats.blocks_in += n
        self.stats.bytes_in += n * self.block_nbytes
        if not self.has_data or not n:
            return None
        keys = list(keys)
        if self.storage is not None:
            return WriteSlots(self, list(slots), keys, self.gens_of(keys), src)
        return WriteFiles(self, keys, self.gens_of(keys), src)

    def delete_step(self, block_hashes: Sequence[Hashable]) -> Step | None:
        """A step removing the files of blocks that left the tier."""
        if self.disk is None or not block_hashes:
            return None
        return DeleteFiles(self, list(block_hashes))

    # -- membership ----------------------------------------------------------
    def insert(
        self,
        block_hashes: Sequence[Hashable],
        source: Buf | None,
        plan: Any,
        *,
        keep_victim_bytes: bool = True,
    ) -> tuple[list[Hashable], Buf | None]:
        """Make ``block_hashes`` resident, the first given the least recent.

        Hashes already resident are only refreshed and keep their slots; the
        new ones share the other slots, the oldest that do not fit fall
        through. Bytes come from ``source`` (one entry per given hash, in order).

        Args:
            block_hashes: blocks to insert, least recent first.
            source: the buffer of their bytes (``None``: metadata-only).
            plan: the ``CopyPlan`` (or a list) the byte-moving steps are appended to,
                in the order they must run.
            keep_victim_bytes: stage the victims' bytes (there is a tier below).

        Returns:
            ``(victim_hashes, victim_buf)``: blocks that left this tier for room
            (least recent first; new blocks that could never fit come first)
            and the buffer their bytes will be in.
        """
        bp = self.pool
        cached = bp.cached
        present = list(dict.fromkeys(cached[h] for h in block_hashes if h in cached))
        seen_new: set = set()
        new_idx: list[int] = []
        for i, h in enumerate(block_hashes):
            if h not in cached and h not in seen_new:
                seen_new.add(h)
                new_idx.append(i)
        if present:
            bp.touch(present)
        overflow: list[int] = []
        # the refreshed blocks are held until the end: the new ones get the other slots
        # (free or evictable: not those held for a batch); more new blocks than that and
        # the oldest fall through (they are the victims)
        room = block_room(bp, len(new_idx)).supply  # leaf-only: fewer (held children)
        if len(new_idx) > room:
            overflow = new_idx[: len(new_idx) - room]
            new_idx = new_idx[len(new_idx) - room :]
        rec = self._recorder
        rec.victims.clear()
        slots = bp.allocate(len(new_idx)) if new_idx else []
        victim_slots = [b for b, _ in rec.victims]
        victim_hashes = [h for _, h in rec.victims]
        rec.victims.clear()
        if self._gen:
            for h in victim_hashes:
                self._gen.pop(h, None)
        self.stats.evicted_blocks += len(victim_hashes)
        victim_buf = None
        if victim_hashes:
            # the victims' bytes must be staged before their slots are overwritten
            if keep_victim_bytes:
                victim_buf = Buf(f"{self.name}:victims")
                step = self.read_step(victim_hashes, victim_buf, victim_slots)
                if step is None:
                    victim_buf = None
                plan.append(step)
            plan.append(self.delete_step(victim_hashes))
        if new_idx:
            new_hashes = [block_hashes[i] for i in new_idx]
            self._stamp(new_hashes)
            if source is not None and self.has_data:
                part = source
                if len(new_idx) != len(block_hashes):  # a subset: select it (a copy)
                    part = Buf(f"{source.label}@{self.name}")
                    plan.append(Select(source, new_idx, part))
                plan.append(self.write_step(slots, new_hashes, part))
            else:
                self.write_step(slots, new_hashes, Buf())  # counts the traffic only
            bp.cache_blocks(slots, new_hashes)
        # release least recent last: release() is tail-first, so pass newest first
        order = list(dict.fromkeys(cached[h] for h in block_hashes if h in cached))
        if order:
            bp.release(order[::-1])
        if overflow:
            of_hashes = [block_hashes[i] for i in overflow]
            if not keep_victim_bytes or source is None:
                return of_hashes + victim_hashes, None
            of_buf = Buf(f"{source.label}>{self.name}:overflow")
            plan.append(Select(source, overflow, of_buf))
            if victim_buf is None:
                return of_hashes + victim_hashes, of_buf
            both = Buf(f"{of_buf.label}+{victim_buf.label}")
            plan.append(Concat(of_buf, victim_buf, both))
            return of_hashes + victim_hashes, both
        return victim_hashes, victim_buf

    def remove(self, block_hashes: Sequence[Hashable], plan: Any) -> None:
        """Drop resident blocks (promotion out of an exclusive tier). Read them first."""
        if self._held:
            self._unhold(block_hashes)
        for h in block_hashes:
            self.pool.uncache(self.pool.cached[h], reason="promote")
        if self._gen:
            for h in block_hashes:
                self._gen.pop(h, None)
        plan.append(self.delete_step(block_hashes))

    def reset(self) -> None:
        if self.disk is not None:
            for k in list(self.pool.cached):
                self.disk.delete(k)
        self.pool.reset()
        self._gen.clear()
        self._held.clear()
        self.stats = TierStats(self.name, self.num_blocks)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    def check_invariants(self) -> None:
        bp = self.pool
        bp.check_invariants()
        assert not self._held, f"tier {self.name}: {len(self._held)} holds left"
        assert bp.num_used == 0, f"tier {self.name}: {bp.num_used} slots left in use"
        assert bp.num_cached <= self.num_blocks
        if self.has_data:
            assert self._gen.keys() == bp.cached.keys(), (
                f"tier {self.name}: stamps differ from index"
            )
