"""Tiered KV offload: a device pool over host-memory and disk tiers (see ``manager.py``)."""

from .disk import DiskBlockStore
from .manager import (
    WRITE_POLICIES,
    KVOffloadManager,
    OffloadAllocation,
    OffloadLookup,
    OnboardResult,
)
from .tiers import LowerTier, TierConfig, TierKind, TierStats

__all__ = [
    "WRITE_POLICIES",
    "DiskBlockStore",
    "KVOffloadManager",
    "LowerTier",
    "OffloadAllocation",
    "OffloadLookup",
    "OnboardResult",
    "TierConfig",
    "TierKind",
    "TierStats",
]
