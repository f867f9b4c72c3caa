"""The eviction policy interface: the pool does the moving, a policy decides the order.

The block pool (``block_pool.py``) owns every block's state. A policy only
sees the events below and answers one question, "which evictable block goes
next?". Evictable means: cached (has a hash), ref count 0, not pinned.

Event order for one block's life in the cache::

    on_cached(b, h, parent)   block registered under hash h (it is in use now)
    on_hit(b)                 a lookup hit it (any state)          [if tracks_hits]
    add(b)                    it became evictable (released to ref 0)
    remove(b)                 it stopped being evictable without eviction (hit, pin)
    pop_victim() -> b         the pool asks for a victim; the policy forgets b as evictable
    on_evicted(b, h)          the pool dropped b's hash after eviction
    on_removed(b, h)          b's hash was dropped without eviction (invalidate, clear)

A request's blocks are released tail-first (``add`` is called for its last
block first), so a recency policy evicts a request's suffix before its prefix.

Every event must be O(1) or O(log n); no policy may scan all blocks per
eviction. Block ids are small non-negative ints but a policy must not assume
an upper bound (standalone prefix caches grow).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable, Iterable
from typing import Protocol

from ..errors import KVNoVictimError

__all__ = ["EvictionPolicy"]


class _Members(Protocol):
    """What ``len`` and ``in`` need (a dict, a set, a ``LazyHeap``)."""

    def __len__(self) -> int: ...

    def __contains__(self, item: object, /) -> bool: ...


class EvictionPolicy:
    """Base class of block eviction policies.

    Subclasses implement ``add``, ``remove`` and ``pop_victim``, and either set
    ``_evictable`` (the one container of their evictable block ids, kept for
    the policy's life: ``len`` and ``in`` answer from it) or implement
    ``__len__`` and ``__contains__``; they may override the other hooks
    (no-ops here).

    Attributes:
        name: registry name (``"lru"``...).
        tracks_hits: when False the pool skips ``on_hit`` calls entirely (a
            policy that only orders by release time needs no hit events).
        clock: seconds, monotonic; the pool passes its own (simulated) clock.
        stable_victim_order: True when ``peek_victims(k)`` taken before a batch
            is the order the batch's evictions then follow, less the blocks
            it references, whatever else it hits or inserts. The scheduler's
            plan is exact only then; ARC, whose choice between its lists
            moves with every hit and ghost hit, is the one policy here
            without it.
    """

    name: str = "base"
    description: str = ""
    tracks_hits: bool = False
    stable_victim_order: bool = True

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock or time.monotonic
        self.capacity: int | None = None

    def set_capacity(self, num_blocks: int | None) -> None:
        """The pool's size in blocks (called once by the pool; None for unbounded caches).

        Policies with size-relative parameters (S3-FIFO's small queue, ARC's
        target, SLRU's protected segment) size them from this.
        """
        self.capacity = num_blocks

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        raise NotImplementedError

    def add_many(self, block_ids: Iterable[int]) -> None:
        """``add`` for each id in order (subclasses may batch)."""
        for b in block_ids:
            self.add(b)

    def remove(self, block_id: int) -> None:
        raise NotImplementedError

    def remove_many(self, block_ids: Iterable[int]) -> None:
        for b in block_ids:
            self.remove(b)

    def touch_many(self, block_ids: list[int]) -> None:
        """Refresh evictable blocks as if taken and released again (tail-first): the
        same as ``remove_many(ids)`` then ``add_many(reversed(ids))`` (subclasses may
        do it in one step)."""
        self.remove_many(block_ids)
        self.add_many(reversed(block_ids))

    def pop_victim(self) -> int:
        raise NotImplementedError

    def pop_victims(self, n: int) -> list[int]:
        """``n`` victims in order (the pool checked ``n <= len(self)``; subclasses may batch)."""
        pop = self.pop_victim
        return [pop() for _ in range(n)]

    def peek_victims(self, n: int) -> list[int]:
        """Up to ``n`` ids in the order they would be evicted now (no side effect).

        Costs O(n log size) or better in every policy of this package, never
        O(evictable blocks): a plan asks for the few victims it needs.
        """
        raise NotImplementedError

    def pop_cascade(self, n: int, after: Callable[[int], int]) -> list[int]:
        """``n`` victims as ``n`` successive ``pop_victim`` calls, where ``after(b)``, called
        after each victim ``b`` leaves, returns a block id to ``add`` at that point (or -1);
        it counts for the following victims (``LeafOnly`` uncovering a parent). The
        caller checked that ``n`` victims exist."""
        out: list[int] = []
        pop, add = self.pop_victim, self.add
        for _ in range(n):
            b = pop()
            out.append(b)
            a = after(b)
            if a >= 0:
                add(a)
        return out

    def peek_cascade(self, n: int, after: Callable[[int], int]) -> list[int]:
        """What ``pop_cascade(n, after)`` would give now (up to ``n`` ids), with no side
        effect: the blocks ``after`` returns count as added without being added.
        Policies that do not override it have no cascading peek (``LeafOnly`` then
        peeks on a copy)."""
        raise NotImplementedError

    def is_protected(self, block_id: int) -> bool:
        """Would ``block_id``, evictable now or added now, be refused as a victim for the
        time being (a TTL protection)? Plain policies protect nothing."""
        return False

    def num_victims(self, limit: int, exclude: Collection[int] = ()) -> int:
        """How many victims (at most ``limit``) ``pop_victims`` could give now if the
        evictable blocks in ``exclude`` were taken out first (a cache hit about to
        take them). No side effect. ``pop_victims(n)`` succeeds exactly when
        ``num_victims(n) == n``; policies that refuse some evictable blocks
        (TTL-protected, leaf-only) override it.
        """
        n = len(self)
        if exclude:
            n -= sum(1 for b in exclude if b in self)
        return limit if n >= limit else max(n, 0)

    #: the evictable block ids, for a policy that keeps them in one container
    _evictable: _Members

    def __len__(self) -> int:
        return len(self._evictable)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._evictable

    # -- lifecycle hooks (optional) ------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        """Block registered in the cache; ``parent_block_id`` is -1 for a first block."""

    def on_hit(self, block_id: int) -> None:
        """A lookup hit this block (called only when ``tracks_hits``)."""

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        """The pool evicted ``block_id`` (already returned by ``pop_victim``)."""

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        """The block's hash was dropped without eviction (it is not evictable now)."""

    def reset(self) -> None:
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------
    def _no_victim(self) -> KVNoVictimError:
        return KVNoVictimError(f"{self.name}: no evictable block (all in use or pinned)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(evictable={len(self)})"
