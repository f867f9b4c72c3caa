"""Tiered KV offload: a device pool over host-memory and disk tiers (see ``manager.py``).

Fault injection for the disk tier (tests, chaos runs): ``offload.faults``.
"""

from .disk import DiskBlockStore, DiskIO
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
    "DiskIO",
    "KVOffloadManager",
    "LowerTier",
    "OffloadAllocation",
    "OffloadLookup",
    "OnboardResult",
    "TierConfig",
    "TierKind",
    "TierStats",
]
