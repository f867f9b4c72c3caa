"""Hooks: how the pool and the prefix cache tell the outside world what happened.

Attach any object with some of these methods (subclass ``PoolHook`` for
no-op defaults) with ``pool.add_hook(hook)``. With no hook attached the pool
pays one ``if`` per operation, not per block. Block-level events arrive in
batches (``on_blocks_cached``, ``on_evict_many``: one call per request's run
of blocks); ``PoolHook``'s defaults fan them out to the per-block methods, so
a hook may implement either form (a hook that is not a ``PoolHook`` and lacks
the batched methods gets per-block calls).

Timestamps are the pool's clock (``time.monotonic`` unless a simulator
injected its own).

The parameter types are written once, here: the library's hooks
(``MetricsHook``, ``KVEventStream``, ``AccessStatsHook``) override these
methods with the same parameter names, unannotated (pyright infers their
types from this class; mypy checks each override's arity against it).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .handle import KVHandle

__all__ = ["PoolHook", "ignores_cached"]


class PoolHook:
    """No-op base class of pool / prefix-cache observers."""

    def on_lookup(
        self,
        request_id: str | None,
        block_ids: Sequence[int],
        num_hit_blocks: int,
        num_blocks: int,
        timestamp: float,
    ) -> None:
        """A request looked up its prefix: ``block_ids[:num_hit_blocks]`` were hits,
        the rest of ``block_ids`` are the blocks newly allocated for it (misses)."""

    def on_alloc(self, handle: KVHandle, timestamp: float) -> None:
        """A handle was allocated."""

    def on_free(self, handle: KVHandle, timestamp: float) -> None:
        """A handle was freed."""

    def on_block_cached(
        self, block_id: int, block_hash: Hashable, parent_hash: Hashable | None, timestamp: float
    ) -> None:
        """A block was registered in the prefix cache under ``block_hash``."""

    def on_evict(self, block_id: int, block_hash: Hashable, reason: str, timestamp: float) -> None:
        """A cached block was dropped; ``reason`` is ``"capacity"`` (evicted to make
        room), ``"explicit"`` (evict_by_count / invalidate) or ``"clear"``."""

    # -- batched forms: what the pool calls (one call per batch, not per block) --
    def on_blocks_cached(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[Hashable],
        parent_hash: Hashable | None,
        timestamp: float,
    ) -> None:
        """A chain of blocks was registered: ``block_hashes[i]``'s parent is
        ``block_hashes[i - 1]``, the first one's is ``parent_hash`` (None for a
        first block). The default calls :meth:`on_block_cached` per block (and
        nothing at all when a subclass does not override it)."""
        if type(self).on_block_cached is PoolHook.on_block_cached:
            return
        ph = parent_hash
        for b, h in zip(block_ids, block_hashes):
            self.on_block_cached(b, h, ph, timestamp)
            ph = h

    def on_evict_many(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[Hashable],
        reason: str,
        timestamp: float,
    ) -> None:
        """Blocks dropped together, in eviction order. The default calls
        :meth:`on_evict` per block (nothing when a subclass does not override it)."""
        if type(self).on_evict is PoolHook.on_evict:
            return
        for b, h in zip(block_ids, block_hashes):
            self.on_evict(b, h, reason, timestamp)

    def on_cleared(self, timestamp: float) -> None:
        """The whole cache was cleared (reset)."""


def ignores_cached(cls: type) -> bool:
    """A hook class that keeps ``PoolHook``'s no-op cached-block events (the pool
    skips it when it announces newly cached blocks: ``AccessStatsHook``)."""
    return (
        getattr(cls, "on_blocks_cached", None) is PoolHook.on_blocks_cached
        and getattr(cls, "on_block_cached", None) is PoolHook.on_block_cached
    )
