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

Backed by an ``OrderedDict``: add, remove and pop are O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from itertools import islice

from .base import EvictionPolicy

__all__ = ["MRUPolicy"]


class MRUPolicy(EvictionPolicy):
    name = "mru"
    description = "most recently released first; for scans larger than the cache (SGLang mru)"

    def __init__(self, clock=None) -> None:
        super().__init__(clock)
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest release first

    def add(self, block_id: int) -> None:
        self._order[block_id] = None

    def add_many(self, block_ids: Iterable[int]) -> None:
        self._order.update(dict.fromkeys(block_ids))

    def remove(self, block_id: int) -> None:
        del self._order[block_id]

    def remove_many(self, block_ids: Iterable[int]) -> None:
        order = self._order
        for b in block_ids:
            del order[b]

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

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._order

    def reset(self) -> None:
        self._order.clear()
