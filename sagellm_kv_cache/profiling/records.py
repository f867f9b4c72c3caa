"""One access or eviction as an object: what ``iter_events`` / ``iter_evictions`` yield.

The collector never stores these (it keeps packed records); they are built
from a snapshot on demand, for small collections and tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AccessEvent",
    "BlockId",
    "EvictionEvent",
    "iter_access_events",
    "iter_eviction_events",
    "snapshot_columns",
]

BlockId = str | int | bytes


@dataclass(frozen=True, slots=True)
class _BlockEvent:
    """What every recorded event names: a block, and when."""

    #: the block, as the caller named it (``str``, ``int`` pool block id or ``bytes``)
    block_id: BlockId
    #: seconds since the collector started (or was reset), or on the caller's clock
    timestamp: float


@dataclass(frozen=True, slots=True)
class AccessEvent(_BlockEvent):
    """One recorded access (built on demand by :meth:`AccessStatsCollector.iter_events`)."""

    #: whether the block was found cached
    is_hit: bool
    #: the request that touched it (``None``: not recorded)
    request_id: str | int | None = None
    #: the block's index in the request's prompt, in blocks (0 = first block)
    position: int | None = None
    #: the tier of the access (``"gpu"``, ``"cpu"``...)
    tier: str | None = None
    #: the block's size in bytes
    size_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class EvictionEvent(_BlockEvent):
    """One recorded eviction (``block_id``: the evicted block)."""

    #: why it left (``"capacity"``, ``"explicit"``...)
    reason: str
    #: its block hash, when the caller gave one
    block_hash: bytes | int | None = None


def iter_access_events(s: dict[str, Any]) -> Iterator[AccessEvent]:
    """Every access of snapshot ``s`` as an :class:`AccessEvent`."""
    for b, t, h, r, p, tr, sz in zip(
        s["block"].tolist(),
        s["timestamp"].tolist(),
        s["is_hit"].tolist(),
        s["request"].tolist(),
        s["position"].tolist(),
        s["tier"].tolist(),
        s["size_bytes"].tolist(),
    ):
        yield AccessEvent(
            block_id=s["block_keys"][b],
            timestamp=t,
            is_hit=h,
            request_id=None if r < 0 else s["request_keys"][r],
            position=None if p < 0 else p,
            tier=None if tr < 0 else s["tier_keys"][tr],
            size_bytes=None if sz < 0 else sz,
        )


def iter_eviction_events(s: dict[str, Any]) -> Iterator[EvictionEvent]:
    """Every eviction of snapshot ``s`` as an :class:`EvictionEvent`."""
    for b, t, reason, h in zip(
        s["evict_block"].tolist(), s["evict_ts"].tolist(), s["evict_reason"], s["evict_hash"]
    ):
        yield EvictionEvent(block_id=s["block_keys"][b], timestamp=t, reason=reason, block_hash=h)


def snapshot_columns(
    rows: np.ndarray, keys: tuple[list[Any], list[Any], list[Any]], evictions: tuple[Any, ...]
) -> dict[str, Any]:
    """The snapshot dict of packed ``rows``, the interned ``keys`` (block, request,
    tier) and the eviction columns (codes, seconds, reasons, hashes)."""
    ev_block, ev_ts, ev_reason, ev_hash = evictions
    return {
        "block": rows["block"].astype(np.int64),
        "timestamp": rows["timestamp"].astype(np.float64),
        "is_hit": rows["is_hit"].astype(bool),
        "request": rows["request"].astype(np.int64),
        "position": rows["position"].astype(np.int64),
        "tier": rows["tier"].astype(np.int64),
        "size_bytes": rows["size_bytes"].astype(np.int64),
        "block_keys": keys[0],
        "request_keys": keys[1],
        "tier_keys": keys[2],
        "evict_block": ev_block,
        "evict_ts": ev_ts,
        "evict_reason": ev_reason,
        "evict_hash": ev_hash,
    }
