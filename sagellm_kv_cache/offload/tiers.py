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
calls and moves the bytes in its worker (``ops`` lists of callables).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..block_pool import BlockPool
from ..errors import KVConfigError
from ..hooks import PoolHook

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
    (onboarding to the device, spill further down).
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
        }


class _VictimRecorder(PoolHook):
    """Collects the (slot, hash) pairs a tier's pool evicts for capacity."""

    __slots__ = ("victims",)

    def __init__(self) -> None:
        self.victims: list[tuple[int, Hashable]] = []

    def on_evict(self, block_id, block_hash, reason, timestamp) -> None:
        if reason == "capacity":
            self.victims.append((block_id, block_hash))


#: staged bytes of some blocks: a tensor ``[L, 2, n, <block dims>]`` (host/device)
#: or a list of per-block uint8 arrays (disk); ``None`` in metadata-only mode.
Staged = Any
Op = Callable[[dict], None]


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
        self, block_hashes: Sequence[Hashable], key: str, slots: Sequence[int] | None = None
    ) -> Op | None:
        """An op that stages the bytes of blocks under ``key`` (slots resolved now).

        ``slots`` names them for blocks whose hash was just dropped (victims).
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

        def read_disk(staged: dict) -> None:
            staged[key] = [disk.read(k) for k in keys]

        return read_disk

    def write_op(self, slots: Sequence[int], keys: Sequence[Hashable], key: str) -> Op | None:
        """An op that writes staged bytes ``staged[key]`` into ``slots`` (hashes ``keys``)."""
        n = len(slots)
        self.stats.blocks_in += n
        self.stats.bytes_in += n * self.block_nbytes
        if not self.has_data or not n:
            return None
        if self.storage is not None:
            storage = self.storage
            slots = list(slots)

            def write_host(staged: dict) -> None:
                storage.write_blocks(
                    slots, staged_as_tensor(staged[key], self.block_dims, self.storage_dtype)
                )

            return write_host
        disk = self.disk
        keys = list(keys)

        def write_disk(staged: dict) -> None:
            for k, payload in zip(keys, staged_as_block_payloads(staged[key])):
                disk.write(k, payload)

        return write_disk

    def delete_op(self, block_hashes: Sequence[Hashable]) -> Op | None:
        if self.disk is None or not block_hashes:
            return None
        disk = self.disk
        keys = list(block_hashes)

        def delete_disk(staged: dict) -> None:
            for k in keys:
                disk.delete(k)

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

        Hashes already resident are only refreshed. Bytes come from
        ``staged[source]`` (one entry per given hash, in order).

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
        present = [cached[h] for h in block_hashes if h in cached]
        seen_new: set = set()
        new_idx = [
            i
            for i, h in enumerate(block_hashes)
            if h not in cached and not (h in seen_new or seen_new.add(h))
        ]
        if present:
            bp.touch(present)
        overflow: list[int] = []
        if (
            len(new_idx) > self.num_blocks
        ):  # more new blocks than the tier holds: oldest fall through
            overflow = new_idx[: len(new_idx) - self.num_blocks]
            new_idx = new_idx[len(new_idx) - self.num_blocks :]
        rec = self._recorder
        rec.victims.clear()
        slots = bp.allocate(len(new_idx)) if new_idx else []
        victim_slots = [b for b, _ in rec.victims]
        victim_hashes = [h for _, h in rec.victims]
        rec.victims.clear()
        self.stats.evicted_blocks += len(victim_hashes)
        victim_key = None
        if victim_hashes:
            # the victims' bytes must be staged before their slots are overwritten
            if keep_victim_bytes:
                victim_key = f"{source}>{self.name}:victims"
                op = self.read_op(victim_hashes, victim_key, victim_slots)
                if op is not None:
                    ops.append(op)
            op = self.delete_op(victim_hashes)
            if op is not None:
                ops.append(op)
        if new_idx:
            new_hashes = [block_hashes[i] for i in new_idx]
            key = f"{source}@{self.name}"
            op = self.write_op(slots, new_hashes, key)
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
        op = self.delete_op(block_hashes)
        if op is not None:
            ops.append(op)

    def reset(self) -> None:
        if self.disk is not None:
            for k in list(self.pool.cached):
                self.disk.delete(k)
        self.pool.reset()
        self.stats = TierStats(self.name, self.num_blocks)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    def check_invariants(self) -> None:
        bp = self.pool
        bp.check_invariants()
        assert bp.num_used == 0, f"tier {self.name}: {bp.num_used} slots left in use"
        assert bp.num_cached <= self.num_blocks


def staged_as_tensor(staged: Any, block_dims: tuple[int, ...], storage_dtype: Any):
    """Staged bytes as a ``[L, 2, n, <block dims>]`` tensor in ``storage_dtype``.

    ``block_dims`` is the shape of one block with the block dimension (index 2) of 1.
    """
    import torch

    if isinstance(staged, list):
        parts = [torch.from_numpy(p).view(storage_dtype).reshape(block_dims) for p in staged]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return staged


def staged_as_block_payloads(staged: Any) -> list:
    """Staged bytes as one contiguous payload per block."""
    if isinstance(staged, list):
        return staged
    return [staged[:, :, i].contiguous() for i in range(staged.shape[2])]


def _select_op(src: str, dst: str, index: list[int]) -> Op:
    """An op that stages ``staged[src]`` restricted to blocks ``index`` under ``dst``."""
    idx = list(index)

    def select(staged: dict) -> None:
        data = staged.get(src)
        if data is None:
            return
        if isinstance(data, list):
            staged[dst] = [data[i] for i in idx]
        else:
            import torch

            index = torch.as_tensor(idx, dtype=torch.long, device=data.device)
            staged[dst] = data.index_select(2, index)

    return select


def _concat_key(ops: list, key_a: str, key_b: str | None) -> str:
    if key_b is None:
        return key_a
    out = f"{key_a}+{key_b}"

    def concat(staged: dict) -> None:
        a, b = staged.get(key_a), staged.get(key_b)
        if a is None or b is None:
            return
        if isinstance(a, list) or isinstance(b, list):
            staged[out] = list(staged_as_block_payloads(a)) + list(staged_as_block_payloads(b))
        else:
            import torch

            staged[out] = torch.cat([a, b.to(a.device)], dim=2)

    ops.append(concat)
    return out
