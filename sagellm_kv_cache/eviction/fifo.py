"""First in, first out: evict in the order blocks entered the cache.

Key: ``(0, insertion number)``, the insertion number counting ``on_cached``
calls (1, 2, 3...), smallest first.

Definition (SGLang ``FIFOStrategy``: priority = a node's ``creation_time``;
LMCache's ``FIFOCachePolicy``: the oldest inserted key is evicted first, a hit
does not reorder): among the evictable blocks, the one registered under its
hash earliest (``on_cached``) goes first. Hits and releases never change a
block's place; only a new registration (the block cached again under a new
hash after eviction or invalidation) gives it a new, youngest place.

A block that reaches ``add`` without an ``on_cached`` (a driver that does not
report registrations) counts as inserted at that ``add``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from .keyed import Key, KeyedPolicy

__all__ = ["FIFOPolicy"]


class FIFOPolicy(KeyedPolicy):
    name = "fifo"
    description = "first cached, first evicted; hits do not reorder (SGLang fifo, LMCache FIFO)"
    _lane_k0 = 0  # the lane takes blocks as they are cached: in key order
    _keep_entries = True  # the key is fixed while cached: a hit does not re-file the block

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self._inserted: dict[int, int] = {}  # cached block -> insertion number
        self._count = 0

    def _key(self, block_id: int, release: int) -> Key:
        s = self._inserted.get(block_id)
        if s is None:  # added without on_cached: inserted now
            self._count = s = self._count + 1
            self._inserted[block_id] = s
        return 0, s

    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        self._count = s = self._count + 1
        self._inserted[block_id] = s
        if self._keep_entries:  # queued now, dormant until released
            self._enqueue(block_id, 0, s)

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        self._inserted.pop(block_id, None)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._inserted.pop(block_id, None)
        self._dequeue(block_id)  # a dormant entry (the block is not evictable now)

    def reset(self) -> None:
        super().reset()
        self._inserted.clear()
        self._count = 0
