"""Most recently used: the block released last is evicted first.

Definition (SGLang ``MRUStrategy``: priority = ``-last_access_time``, the
smallest priority is evicted first, i.e. the most recently used node; the
classic MRU of Chou & DeWitt for looping scans larger than the cache): among
the evictable blocks, the one that became evictable last (the latest
``add``) goes first. A hit takes a block out of the order; its next release
puts it at the evicted-first end.

Release order is the pool's: a request's blocks are released tail-first, so
its *first* block is the most recently released and MRU evicts a request's
prefix before its suffix (the mirror image of LRU). Combine with a leaf-only
constraint when orphaned suffixes matter.

Shares ``LRUPolicy``'s ``OrderedDict`` of release order and pops from its other end:
add, remove and pop are O(1).
"""

from __future__ import annotations

from itertools import islice

from .lru import LRUPolicy

__all__ = ["MRUPolicy"]


class MRUPolicy(LRUPolicy):
    """LRU's release-order bookkeeping (add, remove, touch), victims from the other end."""

    name = "mru"
    description = "most recently released first; for scans larger than the cache (SGLang mru)"

    def pop_victim(self) -> int:
        if not self._order:
            raise self._no_victim()
        return self._order.popitem(last=True)[0]

    def pop_victims(self, n: int) -> list[int]:
        if n > len(self._order):
            raise self._no_victim()
        popitem = self._order.popitem
        return [popitem(last=True)[0] for _ in range(n)]

    def peek_victims(self, n: int) -> list[int]:
        return list(islice(reversed(self._order), n))
