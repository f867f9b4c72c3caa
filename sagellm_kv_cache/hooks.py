"""Hooks: how the pool and the prefix cache tell the outside world what happened.

Attach any object with some of these methods (subclass ``PoolHook`` for
no-op defaults) with ``pool.add_hook(hook)``. With no hook attached the pool
pays one ``if`` per operation, not per block.

Timestamps are the pool's clock (``time.monotonic`` unless a simulator
injected its own).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .handle import KVHandle

__all__ = ["PoolHook"]


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

    def on_cleared(self, timestamp: float) -> None:
        """The whole cache was cleared (reset)."""
