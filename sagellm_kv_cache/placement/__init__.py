"""Load-aware placement: which device or serving instance a request goes to.

``LoadAwareScheduler`` (strategies in ``PlacementStrategy``) over a
``LoadMetricsCollector`` of ``DeviceLoadMetrics``, fed by each device's pool.
"""

from .metrics import DeviceLoadMetrics, LoadMetricsCollector
from .scheduler import PREFIX_STRATEGIES, LoadAwareScheduler, PlacementStrategy

__all__ = [
    "PREFIX_STRATEGIES",
    "DeviceLoadMetrics",
    "LoadAwareScheduler",
    "LoadMetricsCollector",
    "PlacementStrategy",
]
