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
calls and moves the bytes in its worker (``ops``: a ``Job``, a list of
callables). The ops fail per block: a disk block that cannot be read (missing
file, bad checksum, I/O error) stages ``None`` and has its file removed; a
block that cannot be written (disk full, its bytes never staged) is not
stored; both are reported to the job (``Job.failed``) with the generation the
tier stamped on that admission, and the manager drops them at settle
(``drop_if_current``, see ``jobs.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..block_pool import BlockPool
from ..errors import KVCacheError, KVConfigError
from ..hooks import PoolHook
from .staging import (
    Op,
    _concat_key,
    _delete_quietly,
    _job,
    _not_staged,
    _present,
    _select_op,
    _typed,
    staged_as_block_payloads,
    staged_as_tensor,
)

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
    """Counters of one tier (monotonic until ``reset``).

    ``hit_blocks``: blocks a lookup found in this tier (first tier holding them);
    ``bytes_in`` / ``blocks_in``: written into this tier (spill, write-through,
    onboarding into the device); ``bytes_out`` / ``blocks_out``: read out of it
    (onboarding to the device, spill further down); ``read_errors``: blocks
    whose bytes could not be read (missing file, bad checksum, I/O error:
    dropped, a miss from then on); ``write_errors``: blocks not stored because
    their write failed (disk full...). Traffic counts what was planned.
    """

    name: str
    capacity_blocks: int
    hit_blocks: int = 0
    blocks_in: int = 0
    blocks_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    evicted_blocks: int = 0
    dropped_blocks: int = 0  # evicted and not admitted below (or no tier below)
    read_errors: int = 0
    write_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capacity_blocks": self.capacity_blocks,
            "hit_blocks": self.hit_blocks,
            "blocks_in": self.blocks_in,
            "blocks_out": self.blocks_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "evicted_blocks": self.evicted_blocks,
            "dropped_blocks": self.dropped_blocks,
            "read_errors": self.read_errors,
            "write_errors": self.write_errors,
        }


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

    # -- bytes ---------------------------------------------------------------
    def read_op(
        self,
        block_hashes: Sequence[Hashable],
        key: str,
        slots: Sequence[int] | None = None,
        job: Any = None,
        *,
        requested: bool = False,
    ) -> Op | None:
        """An op that stages the bytes of blocks under ``key`` (slots resolved now).

        ``slots`` names them for blocks whose hash was just dropped (victims).
        With a ``job``, a disk block that cannot be read stages ``None``, loses
        its file and is reported (``requested``: as the request's own error);
        without one (a debugging read) the typed error propagates.
        """
        n = len(block_hashes)
        self.stats.blocks_out += n
        self.stats.bytes_out += n * self.block_nbytes
        if not self.has_data or not n:
            return None
        if self.storage is not None:
            if slots is None:
                slots = [self.pool.cached[h] for h in block_hashes]
            slots = list(slots)
            storage = self.storage

            def read_host(staged: dict) -> None:
                staged[key] = storage.read_blocks(slots)

            return read_host
        disk = self.disk
        keys = list(block_hashes)
        gens = [self._gen.get(k) for k in keys] if slots is None else [None] * len(keys)

        def read_disk(staged: dict) -> None:
            out = []
            for k, gen in zip(keys, gens):
                try:
                    out.append(disk.read(k))
                except Exception as exc:
                    if job is None:
                        raise
                    out.append(None)
                    _delete_quietly(disk, k)  # a bad copy is dropped, not retried forever
                    job.failed(self, k, gen, "read", _typed(exc, k), requested=requested)
            staged[key] = out

        return read_disk

    def write_op(
        self, slots: Sequence[int], keys: Sequence[Hashable], key: str, job: Any = None
    ) -> Op | None:
        """An op that writes staged bytes ``staged[key]`` into ``slots`` (hashes ``keys``).

        With a ``job``, a block whose bytes were not staged or whose write
        fails is reported as not stored (the manager drops it at settle).
        """
        n = len(slots)
        self.stats.blocks_in += n
        self.stats.bytes_in += n * self.block_nbytes
        if not self.has_data or not n:
            return None
        keys = list(keys)
        gens = [self._gen.get(k) for k in keys]

        def fail(i: int, exc: BaseException) -> None:
            if job is None:
                raise exc
            job.failed(self, keys[i], gens[i], "write", _typed(exc, keys[i]))

        if self.storage is not None:
            storage = self.storage
            slots = list(slots)

            def write_host(staged: dict) -> None:
                data = staged.get(key)
                good = _present(data, n)
                try:
                    if len(good) == n:
                        part = staged_as_tensor(data, self.block_dims, self.storage_dtype)
                        storage.write_blocks(slots, part)
                    elif good:
                        part = [staged_as_block_payloads(data)[i] for i in good]
                        storage.write_blocks(
                            [slots[i] for i in good],
                            staged_as_tensor(part, self.block_dims, self.storage_dtype),
                        )
                except Exception as exc:
                    for i in good:
                        fail(i, exc)
                for i in sorted(set(range(n)) - set(good)):
                    fail(i, _not_staged(keys[i]))

            return write_host
        disk = self.disk

        def write_disk(staged: dict) -> None:
            data = staged.get(key)
            payloads = staged_as_block_payloads(data) if data is not None else [None] * n
            for i, (k, payload) in enumerate(zip(keys, payloads)):
                if payload is None:
                    fail(i, _not_staged(k))
                    continue
                try:
                    disk.write(k, payload)
                except Exception as exc:
                    fail(i, exc)

        return write_disk

    def delete_op(self, block_hashes: Sequence[Hashable], job: Any = None) -> Op | None:
        """An op that removes the files of blocks that left the tier (a failure is reported)."""
        if self.disk is None or not block_hashes:
            return None
        disk = self.disk
        keys = list(block_hashes)

        def delete_disk(staged: dict) -> None:
            for k in keys:
                try:
                    disk.delete(k)
                except KVCacheError as exc:
                    if job is None:
                        raise
                    job.failed(self, k, None, "delete", exc)

        return delete_disk

    # -- membership ----------------------------------------------------------
    def insert(
        self,
        block_hashes: Sequence[Hashable],
        source: str | None,
        ops: list,
        *,
        keep_victim_bytes: bool = True,
    ) -> tuple[list[Hashable], str | None]:
        """Make ``block_hashes`` resident, the first given the least recent.

        Hashes already resident are only refreshed and keep their slots; the
        new ones share the other slots, the oldest that do not fit fall
        through. Bytes come from ``staged[source]`` (one entry per given hash,
        in order).

        Args:
            block_hashes: blocks to insert, least recent first.
            source: staging key of their bytes (``None``: metadata-only).
            ops: byte-moving ops are appended here, in the order they must run.
            keep_victim_bytes: stage the victims' bytes (there is a tier below).

        Returns:
            ``(victim_hashes, victim_key)``: blocks that left this tier for room
            (least recent first; new blocks that could never fit come first)
            and the staging key their bytes will be under.
        """
        bp = self.pool
        cached = bp.cached
        present = list(dict.fromkeys(cached[h] for h in block_hashes if h in cached))
        seen_new: set = set()
        new_idx = [
            i
            for i, h in enumerate(block_hashes)
            if h not in cached and not (h in seen_new or seen_new.add(h))
        ]
        if present:
            bp.touch(present)
        overflow: list[int] = []
        # the refreshed blocks are held until the end: the new ones get the other slots;
        # more new blocks than that and the oldest fall through (they are the victims)
        room = self.num_blocks - len(present)
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
        victim_key = None
        if victim_hashes:
            # the victims' bytes must be staged before their slots are overwritten
            if keep_victim_bytes:
                victim_key = f"{source}>{self.name}:victims"
                op = self.read_op(victim_hashes, victim_key, victim_slots, _job(ops))
                if op is not None:
                    ops.append(op)
            op = self.delete_op(victim_hashes, _job(ops))
            if op is not None:
                ops.append(op)
        if new_idx:
            new_hashes = [block_hashes[i] for i in new_idx]
            key = f"{source}@{self.name}"
            self._stamp(new_hashes)
            op = self.write_op(slots, new_hashes, key, _job(ops))
            if op is not None:
                ops.append(_select_op(source, key, new_idx))
                ops.append(op)
            bp.cache_blocks(slots, new_hashes)
        # release least recent last: release() is tail-first, so pass newest first
        order = [cached[h] for h in block_hashes if h in cached]
        seen: set[int] = set()
        order = [b for b in order if not (b in seen or seen.add(b))]
        if order:
            bp.release(order[::-1])
        if overflow:
            of_hashes = [block_hashes[i] for i in overflow]
            if not keep_victim_bytes:
                return of_hashes + victim_hashes, None
            key = f"{source}>{self.name}:overflow"
            ops.append(_select_op(source, key, overflow))
            return of_hashes + victim_hashes, _concat_key(ops, key, victim_key)
        return victim_hashes, victim_key

    def remove(self, block_hashes: Sequence[Hashable], ops: list) -> None:
        """Drop resident blocks (promotion out of an exclusive tier). Read them first."""
        for h in block_hashes:
            self.pool.uncache(self.pool.cached[h], reason="promote")
        if self._gen:
            for h in block_hashes:
                self._gen.pop(h, None)
        op = self.delete_op(block_hashes, _job(ops))
        if op is not None:
            ops.append(op)

    def reset(self) -> None:
        if self.disk is not None:
            for k in list(self.pool.cached):
                self.disk.delete(k)
        self.pool.reset()
        self._gen.clear()
        self.stats = TierStats(self.name, self.num_blocks)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    def check_invariants(self) -> None:
        bp = self.pool
        bp.check_invariants()
        assert bp.num_used == 0, f"tier {self.name}: {bp.num_used} slots left in use"
        assert bp.num_cached <= self.num_blocks
        if self.has_data:
            assert self._gen.keys() == bp.cached.keys(), (
                f"tier {self.name}: stamps differ from index"
            )
