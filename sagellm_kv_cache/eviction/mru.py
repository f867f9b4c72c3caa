"""Most recently used: the block released last is evicted first.

Key: ``(0, -release number)``, smallest first: the latest ``add`` goes first.

Definition (SGLang ``MRUStrategy``: priority = ``-last_access_time``, the
smallest priority is evicted first, i.e. the most recently used node; the
classic MRU of Chou & DeWitt for looping scans larger than the cache): among
the evictable blocks, the one that became evictable last goes first. A hit
takes a block out of the order; its next release puts it at the
evicted-first end.

Release order is the pool's: a request's blocks are released tail-first, so
its *first* block is the most recently released and MRU evicts a request's
prefix before its suffix (the mirror image of LRU). Combine with a leaf-only
constraint when orphaned suffixes matter.
"""

from __future__ import annotations

from .keyed import Key, KeyedPolicy

__all__ = ["MRUPolicy"]


class MRUPolicy(KeyedPolicy):
    name = "mru"
    description = "most recently released first; for scans larger than the cache (SGLang mru)"
    _lane_k0 = 0  # every release comes in (falling) key order
    _lane_desc = True

    def _key(self, block_id: int, release: int) -> Key:
        return 0, -release
