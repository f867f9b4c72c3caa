"""Introspection and retention of ``KVPool``: ``get_stats``, ``check_invariants``,
``set_retention`` / ``pin_prefix`` (policies ``"priority"`` and ``"ttl"``).

Mixed into ``KVPool`` (``pool.py``); the state it reads is declared in
``_pool_base.PoolBase``. Hit ratios say what they count: ``token_hit_ratio``,
``block_hit_ratio``, ``request_hit_ratio`` (DESIGN.md).
"""

from __future__ import annotations

from typing import Any

from ._pool_base import PoolBase
from .errors import KVConfigError, KVInvalidInputError
from .handle import KVHandle

__all__ = ["PoolInfoMixin"]


class PoolInfoMixin(PoolBase):
    """Retention calls, stats and invariant checks for ``KVPool``."""

    # -- retention (policies "priority" and "ttl", also under "leaf:") -------
    def _policy_method(self, name: str) -> Any:
        p: Any = self._blocks.policy
        while p is not None:
            method = getattr(p, name, None)
            if method is not None:
                return method
            p = getattr(p, "inner", None)  # wrappers (leaf-only) hold the real policy
        raise KVConfigError(
            f"eviction policy {self._blocks.policy.name!r} has no {name}(); "
            "create the pool with eviction_policy='priority' (set_retention) or 'ttl' (pin_prefix)"
        )

    def _cached_ids(self, handle: KVHandle) -> list[int]:
        hashes = self._blocks.block_hashes
        ids = [b for b in handle.block_ids if hashes[b] is not None]
        if not ids:
            raise KVInvalidInputError(
                f"handle {handle.handle_id} has no cached blocks; call cache_blocks() first"
            )
        return ids

    def set_retention(
        self, handle: KVHandle, priority: int, duration_s: float | None = None
    ) -> None:
        """Give ``handle``'s cached blocks a retention priority (0..100, TensorRT-LLM style).

        Needs the ``"priority"`` policy. Lower priorities are evicted first; with
        ``duration_s`` the priority falls back to the default once the blocks have
        been evictable that long. Raises ``KVConfigError`` for another policy.
        """
        with self._lock:
            self._check_handle(handle)
            self._policy_method("set_retention")(self._cached_ids(handle), priority, duration_s)

    def pin_prefix(self, handle: KVHandle, ttl_s: float) -> None:
        """Protect ``handle``'s cached blocks (e.g. a system prompt) from eviction for
        ``ttl_s`` seconds, like prompt caching with an explicit cache-control.

        Needs the ``"ttl"`` policy; unlike :meth:`pin` it outlives the handle
        (free it as usual) and ends by itself. Raises ``KVConfigError`` for
        another policy.
        """
        with self._lock:
            self._check_handle(handle)
            self._policy_method("pin_for")(self._cached_ids(handle), ttl_s)

    def get_stats(self) -> dict[str, Any]:
        """A snapshot of sizes and counters (a new dict; safe to keep)."""
        with self._lock:
            bp = self._blocks
            q_tok = self._prefix_query_tokens
            return {
                "max_tokens": self.max_tokens,
                "block_size": self.block_size,
                "total_blocks": self.num_blocks,
                "free_blocks": bp.num_free,
                "evictable_blocks": bp.num_evictable,
                "used_blocks": bp.num_used,
                "cached_blocks": bp.num_cached,
                "allocated_tokens": bp.num_used * self.block_size,
                "available_tokens": bp.num_available * self.block_size,
                "usage": bp.num_used / self.num_blocks,
                "num_handles": len(self._handles),
                "num_allocs": self._num_allocs,
                "num_frees": self._num_frees,
                "num_evictions": bp.num_evictions,
                "evictions_by_reason": dict(bp.evictions_by_reason),
                "num_blocks_cached_total": bp.num_cached_total,
                "prefix_requests": self._prefix_requests,
                "prefix_query_tokens": q_tok,
                "prefix_hit_tokens": self._prefix_hit_tokens,
                "prefix_query_blocks": self._prefix_query_blocks,
                "prefix_hit_blocks": self._prefix_hit_blocks,
                "token_hit_ratio": self._prefix_hit_tokens / q_tok if q_tok else 0.0,
                "block_hit_ratio": (
                    self._prefix_hit_blocks / self._prefix_query_blocks
                    if self._prefix_query_blocks
                    else 0.0
                ),
                "request_hit_ratio": (
                    self._prefix_hit_requests / self._prefix_requests
                    if self._prefix_requests
                    else 0.0
                ),
                "eviction_policy": bp.policy.name,
                "device": self.device,
                "dtype": self.dtype,
                "metadata_only": self.metadata_only,
                "kv_bytes": self.storage.nbytes if self.storage is not None else 0,
            }

    def check_invariants(self) -> None:
        """Assert structural invariants, including that live handles hold their blocks."""
        with self._lock:
            bp = self._blocks
            bp.check_invariants()
            refs = [0] * self.num_blocks
            for h in self._handles.values():
                for b in h.block_ids:
                    refs[b] += 1
            assert refs == bp.ref_counts, "block ref counts differ from live handles' references"
