"""The seed's plain data types (``KVBlock``, ``KVPoolStats``...), as dataclasses and enums.

The seed re-exported these from its protocol package; here they are small,
dependency-free records with the seed's field names where they are known.
They describe state, they do not hold it: a ``KVPoolStats`` is a snapshot
taken with ``KVPoolStats.from_pool(pool)``, a ``KVBlock`` one block's view
taken with ``KVBlock.from_pool(pool, block_id)``.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from ..lifetime import LifetimePrediction

__all__ = [
    "DType",
    "EvictionCandidate",
    "KVBlock",
    "KVBlockState",
    "KVPoolStats",
    "KVTransferMetadata",
    "Layout",
    "LifetimePrediction",
    "PrefixCacheEntry",
    "SchedulerRequest",
]


class DType(enum.StrEnum):
    """KV element types (values are this package's canonical dtype names)."""

    FP16 = "float16"
    BF16 = "bfloat16"
    FP32 = "float32"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"


class Layout(enum.StrEnum):
    """Block memory layouts (``KVLayout``'s values; the seed's CONTIGUOUS is NHD)."""

    NHD = "NHD"
    HND = "HND"
    CONTIGUOUS = "NHD"  # alias: the seed's default layout is this package's default


class KVBlockState(enum.StrEnum):
    """One pool block's state, as ``KVBlock.from_pool`` reads it."""

    FREE = "free"  # no hash, no reference: ready to allocate
    ALLOCATED = "allocated"  # referenced by a live handle, not cached
    CACHED = "cached"  # has a hash and is referenced (in use)
    EVICTABLE = "evictable"  # has a hash, no reference, not pinned
    PINNED = "pinned"  # pinned (never evicted)


@dataclass(slots=True)
class KVBlock:
    block_id: int
    block_hash: Any = None
    state: KVBlockState = KVBlockState.FREE
    ref_count: int = 0
    pin_count: int = 0
    num_tokens: int = 0

    @classmethod
    def from_pool(cls, pool: Any, block_id: int) -> KVBlock:
        """The current view of block ``block_id`` of a ``KVPool`` (or ``BlockPool``)."""
        bp = getattr(pool, "block_pool", pool)
        if isinstance(block_id, bool) or not isinstance(block_id, int):
            from ..errors import KVInvalidTypeError

            raise KVInvalidTypeError(f"block_id must be an int, got {block_id!r}")
        if not 0 <= block_id < bp.num_blocks:
            from ..errors import KVInvalidInputError

            raise KVInvalidInputError(f"block_id {block_id} outside [0, {bp.num_blocks})")
        ref, pins, h = bp.ref_counts[block_id], bp.pin_counts[block_id], bp.block_hashes[block_id]
        if pins:
            state = KVBlockState.PINNED
        elif h is not None:
            state = KVBlockState.CACHED if ref else KVBlockState.EVICTABLE
        else:
            state = KVBlockState.ALLOCATED if ref else KVBlockState.FREE
        return cls(block_id, h, state, ref, pins, bp.block_size if h is not None else 0)


@dataclass(slots=True)
class KVTransferMetadata:
    """The seed's description of one KV transfer (a record; nothing here moves bytes)."""

    #: unique id of the transfer (a random UUID by default)
    transfer_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: id of the ``KVHandle`` whose KV is moved
    handle_id: str = ""
    #: rank of the sending process
    src_rank: int = 0
    #: rank of the receiving process
    dst_rank: int = 0
    #: tokens of KV moved
    num_tokens: int = 0
    #: blocks moved
    num_blocks: int = 0
    #: payload size in bytes
    size_bytes: int = 0
    #: ``"pending"``, ``"running"``, ``"completed"`` or ``"failed"`` (``TransferStatus`` values)
    status: str = "pending"
    #: when the record was made, seconds since the epoch (``time.time()``)
    created_at: float = field(default_factory=time.time)
    #: when the transfer ended, seconds since the epoch; ``None`` until then
    completed_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class PrefixCacheEntry:
    prefix_tokens: tuple[int, ...]
    handle_id: str
    num_tokens: int
    created_at: float = field(default_factory=time.time)
    hit_count: int = 0


@dataclass(slots=True)
class EvictionCandidate:
    handle_id: str
    num_tokens: int
    last_access_at: float
    priority: int = 0
    reuse_probability: float | None = None

    @classmethod
    def from_handle(cls, handle: Any, prediction: LifetimePrediction | None = None):
        return cls(
            handle.handle_id,
            handle.num_tokens,
            handle.last_access_at,
            int((handle.metadata or {}).get("priority", 0)),
            None if prediction is None else prediction.reuse_probability,
        )


@dataclass(slots=True)
class SchedulerRequest:
    request_id: str
    num_tokens: int
    prompt_tokens: list[int] | None = None
    priority: int = 0
    session_id: str | None = None
    arrival_time: float = field(default_factory=time.time)

    def to_sched_request(self) -> Any:
        """This request as ``SchedulerBridge.plan`` takes it."""
        from ..scheduler import SchedRequest

        return SchedRequest(self.request_id, self.num_tokens, self.prompt_tokens)


@dataclass(slots=True)
class KVPoolStats:
    total_blocks: int
    used_blocks: int
    free_blocks: int
    cached_blocks: int
    total_tokens: int
    allocated_tokens: int
    available_tokens: int
    num_handles: int
    evictions: int

    @property
    def utilization(self) -> float:
        return self.used_blocks / self.total_blocks if self.total_blocks else 0.0

    @classmethod
    def from_pool(cls, pool: Any) -> KVPoolStats:
        """A snapshot of a ``KVPool``'s occupancy."""
        bp = pool.block_pool
        return cls(
            total_blocks=bp.num_blocks,
            used_blocks=bp.num_used,
            free_blocks=bp.num_free,
            cached_blocks=bp.num_cached,
            total_tokens=pool.max_tokens,
            allocated_tokens=pool.get_allocated_tokens(),
            available_tokens=pool.get_available_tokens(),
            num_handles=len(pool.handles),
            evictions=bp.num_evictions,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["utilization"] = self.utilization
        return d
