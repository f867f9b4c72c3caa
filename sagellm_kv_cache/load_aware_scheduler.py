"""The seed's import path of the load-aware scheduler (it lives in ``sagellm_kv_cache.placement``)."""

from .placement.scheduler import LoadAwareScheduler, PlacementStrategy

__all__ = ["LoadAwareScheduler", "PlacementStrategy"]
