"""Access profiling: record which KV blocks are touched, when, hit or miss.

``AccessStatsCollector`` stores accesses column-wise (numpy/array buffers,
no per-event objects) and summarises them (hit rate, per-window rates, reuse
distance and time, hottest blocks, hit rate by prompt position).
``AccessStatsHook`` feeds it from the pool and prefix cache.

DataFrame analyses live in :mod:`sagellm_kv_cache.profiling.analysis`
(polars; imported only when used) and the plots in ``sim.analysis.plots``.
"""

from .collector import TIME_WINDOWS, AccessStatsCollector
from .export import FORMAT_NAME, FORMAT_VERSION
from .hook import AccessStatsHook
from .records import AccessEvent, EvictionEvent

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TIME_WINDOWS",
    "AccessEvent",
    "AccessStatsCollector",
    "AccessStatsHook",
    "EvictionEvent",
]
