"""The seed package's face (``isagellm-kv-cache`` 0.5.4.15): its data types, its
``PrefixIndex`` and the mixins that give the core classes the seed's methods.

Nothing here is the core: the pool, the policies and the tiers live in their
own modules; these are the names and signatures a port from the seed expects.
"""

from .models import (
    DType,
    EvictionCandidate,
    KVBlock,
    KVBlockState,
    KVPoolStats,
    KVTransferMetadata,
    Layout,
    LifetimePrediction,
    PrefixCacheEntry,
    SchedulerRequest,
)
from .prefix_index import PrefixIndex

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
    "PrefixIndex",
    "SchedulerRequest",
]
