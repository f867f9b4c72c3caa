"""Two recency lists over the cached blocks: the structure under ARC and SLRU.

Every cached block is a *member* of list 1 or list 2 (ARC's T1/T2, SLRU's
probation/protected): ``on_cached`` puts it in one (the subclass decides),
a hit (``on_hit``) promotes a list-1 member to list 2, and the sizes
``n1``/``n2`` count members in use or evictable. Each list keeps its
*evictable* members in an ``OrderedDict``, least recent first: a block takes
the most recent end of its list when it becomes evictable (``add``, as this
package's LRU: a request's blocks, released tail-first, leave its prefix more
recent than its suffix), and a hit on an evictable list-2 member moves it to
that end. Every event is O(1).

What the subclass states:

* ``_first_due(n1, left1, left2)``: whether the next victim comes from list 1,
  given n1 and the evictable counts of the two lists (ARC's REPLACE, SLRU's
  "probation first");
* ``_second_cap()``, when ``_second_bounded``: the most members list 2 may hold;
  beyond it, list 2's least recent evictable members are demoted to list 1's
  most recent end (SLRU's protected segment);
* ``_on_victim(b, from_first)``: bookkeeping after a victim left (ARC's ghosts).

A block released without ever being cached joins list 2 when
``_unlisted_second`` (ARC), else list 1 (SLRU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import chain

from .base import EvictionPolicy

__all__ = ["FIRST", "NONE", "SECOND", "TwoListPolicy"]

NONE, FIRST, SECOND = 0, 1, 2


class TwoListPolicy(EvictionPolicy):
    """Two LRU-ordered lists of cached blocks; subclasses pick the list of each victim."""

    _unlisted_second = False
    _second_bounded = False

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self._max_cached = 0  # most blocks cached at once (sizes of unbounded caches)
        self.reset()

    # -- what a subclass states ----------------------------------------------
    def _first_due(self, n1: int, left1: int, left2: int) -> bool:
        raise NotImplementedError

    def _second_cap(self) -> float:
        raise NotImplementedError

    def _on_victim(self, block_id: int, from_first: bool) -> None:
        """``block_id`` was just evicted from list 1 (``from_first``) or list 2."""

    # -- sizes ---------------------------------------------------------------
    def set_capacity(self, num_blocks: int | None) -> None:
        super().set_capacity(num_blocks)
        if num_blocks:
            self._grow(num_blocks - 1)

    def _grow(self, b: int) -> None:
        self._member += [NONE] * (max(b + 1, 2 * len(self._member), 16) - len(self._member))

    def _join(self, block_id: int, second: bool) -> None:
        """``block_id`` was cached: a member of list 2 if ``second``, else of list 1."""
        if block_id >= len(self._member):
            self._grow(block_id)
        if second:
            self._member[block_id] = SECOND
            self._n2 += 1
        else:
            self._member[block_id] = FIRST
            self._n1 += 1
        cached = self._n1 + self._n2
        if cached > self._max_cached:
            self._max_cached = cached

    def _demote_overflow(self) -> None:
        cap = self._second_cap()
        first, second, member = self._first, self._second, self._member
        while self._n2 > cap and second:
            b = second.popitem(last=False)[0]
            first[b] = None
            member[b] = FIRST
            self._n2 -= 1
            self._n1 += 1

    # -- evictable set -------------------------------------------------------
    def _in_second(self, m: int) -> bool:
        return m == SECOND or (m == NONE and self._unlisted_second)

    def add(self, block_id: int) -> None:
        self.add_many((block_id,))

    def add_many(self, block_ids: Iterable[int]) -> None:
        member, first, second = self._member, self._first, self._second
        seconds = (SECOND, NONE) if self._unlisted_second else (SECOND,)
        bounded = self._second_bounded
        cap = self._second_cap() if bounded else 0
        for b in block_ids:
            if member[b] in seconds:
                second[b] = None
                if bounded and self._n2 > cap:
                    self._demote_overflow()
            else:
                first[b] = None

    def remove(self, block_id: int) -> None:
        del (self._second if self._in_second(self._member[block_id]) else self._first)[block_id]

    def remove_many(self, block_ids: Iterable[int]) -> None:
        member, first, second = self._member, self._first, self._second
        seconds = (SECOND, NONE) if self._unlisted_second else (SECOND,)
        for b in block_ids:
            del (second if member[b] in seconds else first)[b]

    def pop_victim(self) -> int:
        first, second = self._first, self._second
        if not (first or second):
            raise self._no_victim()
        from_first = bool(first) and self._first_due(self._n1, len(first), len(second))
        if from_first:
            b = first.popitem(last=False)[0]
            self._n1 -= 1
        else:
            b = second.popitem(last=False)[0]
            self._n2 -= 1
        self._member[b] = NONE
        self._on_victim(b, from_first)
        return b

    def pop_victims(self, n: int) -> list[int]:
        if n > len(self._first) + len(self._second):
            raise self._no_victim()
        pop = self.pop_victim
        return [pop() for _ in range(n)]

    def peek_victims(self, n: int) -> list[int]:
        return self.peek_cascade(n, _nothing)

    def peek_cascade(self, n: int, after: Callable[[int], int]) -> list[int]:
        # the pops' choices depend on the sizes, which popping changes: walk both lists
        member, seconds = self._member, (SECOND, NONE) if self._unlisted_second else (SECOND,)
        cap = self._second_cap() if self._second_bounded else 0
        out: list[int] = []
        add1: list[int] = []  # counted as added (most recent end of each list), in order
        add2: list[int] = []
        it1, it2 = chain(self._first, add1), chain(self._second, add2)
        left1, left2 = len(self._first), len(self._second)
        n1, n2 = self._n1, self._n2
        while len(out) < n and left1 + left2:
            if left1 and self._first_due(n1, left1, left2):
                b = next(it1)
                left1 -= 1
                n1 -= 1
            else:
                b = next(it2)
                left2 -= 1
                n2 -= 1
            out.append(b)
            a = after(b)
            if a < 0:
                continue
            if member[a] not in seconds:
                add1.append(a)
                left1 += 1
                continue
            add2.append(a)
            left2 += 1
            while self._second_bounded and n2 > cap and left2:  # add's demotion
                add1.append(next(it2))
                left2 -= 1
                n2 -= 1
                left1 += 1
                n1 += 1
        return out

    def __len__(self) -> int:
        return len(self._first) + len(self._second)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._first or block_id in self._second

    # -- lifecycle -----------------------------------------------------------
    def on_hit(self, block_id: int) -> None:
        member = self._member
        if block_id >= len(member):
            return
        m = member[block_id]
        if m == FIRST:
            member[block_id] = SECOND
            self._n1 -= 1
            self._n2 += 1
            if block_id in self._first:
                del self._first[block_id]
                self._second[block_id] = None
            if self._second_bounded and self._n2 > self._second_cap():
                self._demote_overflow()
        elif m == SECOND and block_id in self._second:
            self._second.move_to_end(block_id)

    def on_removed(self, block_id: int, block_hash: object) -> None:
        m = self._member[block_id]
        if m == FIRST:
            self._n1 -= 1
            self._first.pop(block_id, None)
        elif m == SECOND:
            self._n2 -= 1
            self._second.pop(block_id, None)
        self._member[block_id] = NONE

    def reset(self) -> None:
        self._member: list[int] = []  # per block: NONE / FIRST / SECOND
        self._first: OrderedDict[int, None] = OrderedDict()  # evictable members, LRU first
        self._second: OrderedDict[int, None] = OrderedDict()
        self._n1 = 0  # members of list 1 (in use or evictable)
        self._n2 = 0
        self._max_cached = 0
        if self.capacity:
            self._grow(self.capacity - 1)


def _nothing(block_id: int) -> int:
    return -1
