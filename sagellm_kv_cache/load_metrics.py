"""The seed's import path of the placement metrics (they live in ``sagellm_kv_cache.placement``)."""

from .placement.metrics import DeviceLoadMetrics, LoadMetricsCollector

__all__ = ["DeviceLoadMetrics", "LoadMetricsCollector"]
