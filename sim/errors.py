"""Errors of the simulator's own concepts, on the library's typed base (``KVCacheError``).

The library (``sagellm_kv_cache.errors``) keeps the errors an engine can meet;
what only the workbench raises lives here, with the same stable ``code``.
"""

from __future__ import annotations

from sagellm_kv_cache.errors import KVCacheError

__all__ = ["KVSweepJobError"]


class KVSweepJobError(KVCacheError):
    """One job of a replay sweep failed; ``details["job"]`` names it and
    ``__cause__`` is the worker's error."""

    code = "KV_SWEEP_JOB_FAILED"
