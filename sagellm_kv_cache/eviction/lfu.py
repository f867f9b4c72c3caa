"""Least frequently used, ties to the least recently released.

Key: ``(frequency, release number)``, smallest first.

Definition (SGLang ``LFUStrategy``: priority = ``(hit_count, last_access_time)``,
smallest first; the classic LFU with LRU tie-breaking): a block's frequency
counts its accesses while it holds its current hash, the insertion
(``on_cached``) counting as 1 and every lookup hit (``on_hit``) adding 1.
Among the evictable blocks, the one with the smallest frequency goes first;
equal frequencies go in LRU order, recency being the pool's release order
(as ``LRUPolicy``: a request's blocks are released tail-first, so among
equals its suffix goes before its prefix).

The frequency belongs to the cached content: it is forgotten when the
block's hash is evicted or dropped (``on_evicted`` / ``on_removed``), so a
block cached again under a new hash starts at 1. A hit on a block the
policy has not seen cached (nor added) is ignored. A block hit while
evictable (standalone caches; the pool takes a block out of the order before
its hit) keeps its release number under its higher frequency.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from .keyed import Key, KeyedPolicy

__all__ = ["LFUPolicy"]


class LFUPolicy(KeyedPolicy):
    name = "lfu"
    description = "fewest accesses (insert + hits) first, ties least recently released (SGLang lfu)"
    tracks_hits = True
    _lane_k0 = 1  # blocks never hit are released in key order

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self._freq: dict[int, int] = {}  # cached block -> access count

    def frequency(self, block_id: int) -> int:
        """Accesses counted for ``block_id``'s current hash (0 when not cached)."""
        return self._freq.get(block_id, 0)

    def _key(self, block_id: int, release: int) -> Key:
        f = self._freq.get(block_id)
        if f is None:  # added without on_cached: one access
            f = self._freq[block_id] = 1
        return f, release

    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        self._freq[block_id] = 1

    def on_hit(self, block_id: int) -> None:
        f = self._freq.get(block_id)
        if f is None:
            return
        self._freq[block_id] = f + 1
        if block_id in self._rel:
            self._refile(block_id)

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        self._freq.pop(block_id, None)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._freq.pop(block_id, None)

    def reset(self) -> None:
        super().reset()
        self._freq.clear()
