"""sagellm-kv-cache: the KV-cache layer of an LLM inference engine.

Public names are imported lazily, so ``import sagellm_kv_cache`` stays light
(no torch, no polars) until a part that needs them is used.

    from sagellm_kv_cache import KVPool, PrefixCache, KVHandle
    from sagellm_kv_cache.pool import KVPool          # seed import path
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    # core
    "KVPool": "pool",
    "KVHandle": "handle",
    "HandleState": "handle",
    "MemoryTier": "handle",
    "KVLayout": "handle",
    "PrefixCache": "prefix_cache",
    "BlockPool": "block_pool",
    "KVStorage": "storage",
    "ModelShape": "storage",
    "PoolHook": "hooks",
    "compute_block_hashes": "hashing",
    "compute_block_hash": "hashing",
    # eviction
    "EvictionPolicy": "eviction",
    "make_policy": "eviction",
    "list_policies": "eviction",
    "EvictionManager": "compat.eviction_manager",
    "EvictionStrategy": "compat.eviction_manager",
    "LRUEviction": "compat.eviction_manager",
    "FIFOEviction": "compat.eviction_manager",
    # profiling / observability
    "AccessStatsCollector": "profiling",
    "MetricsCollector": "observability",
    "MetricsHook": "observability",
    # transfer
    "KVTransferEngine": "transfer",
    "SocketTransferBackend": "transfer.backends.socket",
    "CommTransferBackendAdapter": "transfer.backends.comm_adapter",
    # distributed pooling (a global pool over several nodes' pools)
    "GlobalKVPoolManager": "pooling",
    "NodeContribution": "pooling",
    "RemoteKVAccessor": "pooling",
    "KVTransferPipeline": "pooling",
    # tiers and scheduling
    "KVOffloadManager": "offload",
    "SchedulerBridge": "scheduler",
    "SchedulerPlan": "scheduler",
    "KVCacheManager": "scheduler",
    # placement (which device / instance a request goes to)
    "LoadAwareScheduler": "placement",
    "PlacementStrategy": "placement",
    "DeviceLoadMetrics": "placement",
    "LoadMetricsCollector": "placement",
    # the seed's face (compat/) and lifetime prediction
    "PrefixIndex": "compat",
    "KVBlock": "compat",
    "KVBlockState": "compat",
    "KVTransferMetadata": "compat",
    "PrefixCacheEntry": "compat",
    "EvictionCandidate": "compat",
    "SchedulerRequest": "compat",
    "KVPoolStats": "compat",
    "DType": "compat",
    "Layout": "compat",
    "LifetimePredictor": "lifetime",
    "HistoricalPredictor": "lifetime",
    "PredictorFeatures": "lifetime",
    "FeatureExtractor": "lifetime",
    "LifetimePrediction": "lifetime",
}

_ERRORS = (
    "KVCacheError",
    "KVBudgetExceededError",
    "KVPoolFullError",
    "KVInvalidHandleError",
    "KVDoubleFreeError",
    "KVHandlePinnedError",
    "KVRefCountUnderflowError",
    "KVCacheMissError",
    "KVPrefixTooLongError",
    "KVNoVictimError",
    "KVTransferFailedError",
    "KVTransferTimeoutError",
    "KVChecksumMismatchError",
    "KVConfigError",
    "KVInvalidInputError",
    "KVInvalidTypeError",
    "KVTraceFormatError",
    "KVBlockImmutableError",
    "KVStorageError",
    "KVStorageLockedError",
    "KVMemoryExhaustedError",
    "KVHandleNotFoundError",
    "KVEvictionFailedError",
    "KVAllPinnedError",
    "KVMetadataMismatchError",
    "KVConfigMissingError",
    "KVConfigInvalidError",
    "KVNotImplementedError",
)
_LAZY.update(dict.fromkeys(_ERRORS, "errors"))

__all__ = ["__version__", *sorted(_LAZY)]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
