"""Least recently used, ordered by release time (vLLM v1's free-queue order).

A block enters the order when it is released to ref count 0; a request's
blocks are released tail-first, so the suffix is evicted before the prefix.
A hit takes a block out of the order; its next release puts it at the most
recent end. Backed by an ``OrderedDict`` (a C doubly linked list): add,
remove and pop are O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import chain, islice

from .base import EvictionPolicy

__all__ = ["LRUPolicy"]


class LRUPolicy(EvictionPolicy):
    name = "lru"
    description = "least recently released first; a request's blocks released tail-first (vLLM v1)"

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self._order: OrderedDict[int, None] = OrderedDict()
        self._evictable = self._order  # len / in from the base

    @property
    def order(self) -> OrderedDict[int, None]:
        """The evictable blocks, least recent first (the pool's one-pass ``serve`` moves
        them itself, exactly as ``remove`` / ``pop_victims`` / ``add`` would)."""
        return self._order

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

    def touch_many(self, block_ids: list[int]) -> None:
        move = self._order.move_to_end
        for b in reversed(block_ids):
            move(b)

    def pop_victim(self) -> int:
        if not self._order:
            raise self._no_victim()
        return self._order.popitem(last=False)[0]

    def pop_victims(self, n: int) -> list[int]:
        if n > len(self._order):
            raise self._no_victim()
        popitem = self._order.popitem
        return [popitem(last=False)[0] for _ in range(n)]

    def peek_victims(self, n: int) -> list[int]:
        return list(islice(self._order, n))

    def pop_cascade(self, n: int, after: Callable[[int], int]) -> list[int]:
        order = self._order
        popitem = order.popitem
        out: list[int] = []
        for _ in range(n):
            b = popitem(False)[0]
            out.append(b)
            a = after(b)
            if a >= 0:
                order[a] = None  # add(a): the most recent end
        return out

    def peek_cascade(self, n: int, after: Callable[[int], int]) -> list[int]:
        out: list[int] = []
        added: list[int] = []  # counted as added, at the most recent end, in order
        if n <= 0:
            return out
        for b in chain(self._order, added):
            out.append(b)
            if len(out) == n:
                break
            a = after(b)
            if a >= 0:
                added.append(a)
        return out

    def reset(self) -> None:
        self._order.clear()
