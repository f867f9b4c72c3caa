"""One access or eviction as an object: what ``iter_events`` / ``iter_evictions`` yield.

The collector never stores these (it keeps packed records); they are built
from a snapshot on demand, for small collections and tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["AccessEvent", "BlockId", "EvictionEvent", "iter_access_events", "iter_eviction_events"]

BlockId = str | int | bytes


@dataclass(frozen=True, slots=True)
class AccessEvent:
    """One recorded access (built on demand by :meth:`AccessStatsCollector.iter_events`)."""

    block_id: BlockId
    timestamp: float
    is_hit: bool
    request_id: str | int | None = None
    position: int | None = None
    tier: str | None = None
    size_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class EvictionEvent:
    """One recorded eviction."""

    block_id: BlockId
    timestamp: float
    reason: str
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
