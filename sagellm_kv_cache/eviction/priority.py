"""Retention priorities with an optional duration (TensorRT-LLM's KV cache retention).

Definition (TensorRT-LLM ``KvCacheRetentionConfig`` and its prioritized
``LRUEvictionPolicy`` in ``batch_manager/evictionPolicy.cpp``): every cached
block carries a retention priority in 0..100 (default 35). Evictable blocks
sit in one LRU queue per priority; the victim is the front of the lowest
non-empty priority, so lower priorities go first and, within a priority,
the least recently released block goes first (release order as in
``LRUPolicy``: a request's blocks are released tail-first). A priority may
come with a duration: the timer starts when the block becomes evictable
(each release restarts it) and, once it runs out, the block falls back to
the default priority and joins the default queue at its most recent end, as
if released at that moment. A new priority always overrides the previous
one; the priority belongs to the cached content and is forgotten when the
block's hash is evicted or dropped.

Setting a priority (``set_retention``): through the pool's policy object,
``block_pool.policy.set_retention(ids, priority, duration_s)`` or, on a
``KVPool``, ``kv_pool.policy.set_retention(handle.block_ids, ...)`` (only the
blocks already cached count; call it after the blocks are cached). A block
that is evictable when its priority is set keeps its release place and, if
a duration is given, starts its timer at that call.

Expiry never scans: expiring evictable blocks sit in a second heap ordered
by expiry time, processed (in expiry order, ties by release order) at the
start of every ``add``, ``pop`` and ``peek`` and of ``set_retention``, with
the policy clock (``clock`` argument; the pool passes its own). Because
every release processes due expiries first, the order is the same whenever
the processing happens. Every event is O(log n) amortized.

Implementation: evictable blocks at the default priority that joined it in
release order (a release, or an expiry, which counts as a release) sit in an
``OrderedDict`` (block -> release number); every other evictable block (a
non-default priority, or moved to the default one by ``set_retention`` while
evictable, keeping its older place) sits in a lazy-deletion heap keyed by
``(priority, release number)``, and a pop takes the smaller of the two
fronts. With no retention set the policy is an LRU (add, remove, pop O(1))
and the clock is not read.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from itertools import count, islice

from ..errors import KVConfigError, KVInvalidInputError
from ._lazyheap import LazyHeap
from .base import EvictionPolicy

__all__ = ["DEFAULT_PRIORITY", "MAX_PRIORITY", "MIN_PRIORITY", "PriorityPolicy"]

MIN_PRIORITY = 0
MAX_PRIORITY = 100
DEFAULT_PRIORITY = 35


def _check_priority(priority: object, what: str, error: type[Exception]) -> int:
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        raise error(f"{what} must be an int in {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority!r}")
    return priority


class PriorityPolicy(EvictionPolicy):
    """Lowest retention priority first, LRU within a priority; durations fall back to default.

    Args:
        clock: monotonic seconds for durations (the pool passes its own).
        default_priority: the priority of a block nobody set one for (35).
    """

    name = "priority"
    description = (
        "lowest retention priority (0..100, default 35) first, LRU within; "
        "expired durations fall back to default (TensorRT-LLM)"
    )

    def __init__(
        self, clock: Callable[[], float] | None = None, default_priority: int = DEFAULT_PRIORITY
    ) -> None:
        super().__init__(clock)
        self.default_priority = _check_priority(default_priority, "default_priority", KVConfigError)
        # evictable at the default priority, in release order: block -> release number
        self._order: OrderedDict[int, int] = OrderedDict()
        self._heap = LazyHeap()  # other evictable blocks: (priority, release number)
        self._heap_rel: dict[int, int] = {}  # block in _heap -> release number
        self._expiring = LazyHeap()  # evictable with a running timer: (expiry time, release number)
        self._cached: set[int] = set()
        self._priority: dict[int, int] = {}  # cached block -> priority, when not the default
        self._duration: dict[int, float] = {}  # cached block -> duration_s of its priority
        self._next = 0

    # -- public API ----------------------------------------------------------
    def set_retention(
        self, block_ids: Iterable[int], priority: int, duration_s: float | None = None
    ) -> None:
        """Give cached blocks a retention ``priority`` (0..100), for ``duration_s`` if given.

        Without a duration the priority lasts until the block's hash is
        evicted or dropped, or until another ``set_retention``. With one, the
        block falls back to the default priority once it has been evictable
        for ``duration_s`` seconds in a row (timer restarted by each release).

        Raises:
            KVInvalidInputError: a bad priority or duration, or a block that is
                not cached (nothing is changed then).
        """
        priority = _check_priority(priority, "priority", KVInvalidInputError)
        if duration_s is not None and (
            isinstance(duration_s, bool)
            or not isinstance(duration_s, int | float)
            or not (duration_s > 0 and math.isfinite(duration_s))
        ):
            raise KVInvalidInputError(f"duration_s must be a positive number, got {duration_s!r}")
        ids = check_cached_ids(block_ids, self._cached)
        now = self.clock()
        self._expire(now)
        default = self.default_priority
        for b in ids:
            if priority == default:
                self._priority.pop(b, None)
                self._duration.pop(b, None)
            else:
                self._priority[b] = priority
                if duration_s is None:
                    self._duration.pop(b, None)
                else:
                    self._duration[b] = float(duration_s)
            r = self._order.pop(b, None)
            if r is None:
                r = self._heap_rel.get(b)
            if r is not None:  # evictable: re-filed at its release place
                self._heap.push(b, priority, r)
                self._heap_rel[b] = r
                if priority != default and duration_s is not None:
                    self._expiring.push(b, now + duration_s, r)
                else:
                    self._expiring.discard(b)

    def priority_of(self, block_id: int) -> int:
        """The priority ``block_id`` is filed under now (expired durations applied)."""
        self._expire(self.clock())
        return self._priority.get(block_id, self.default_priority)

    # -- expiry --------------------------------------------------------------
    def _expire(self, now: float) -> None:
        expiring = self._expiring
        top = expiring.top_key()
        while top is not None and top[0] <= now:
            b = expiring.pop()
            self._priority.pop(b, None)
            self._duration.pop(b, None)
            self._heap.discard(b)
            del self._heap_rel[b]
            self._next = r = self._next + 1
            self._order[b] = r  # as if released now: the default queue's recent end
            top = expiring.top_key()

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        if self._priority or self._expiring:
            self.add_many((block_id,))
        else:
            self._next = r = self._next + 1
            self._order[block_id] = r

    def add_many(self, block_ids: Iterable[int]) -> None:
        if self._expiring:
            self._expire(self.clock())
        if not self._priority:  # every cached block at the default priority
            c = count(self._next + 1)
            self._order.update(zip(block_ids, c))
            self._next = next(c) - 1
            return
        now = self.clock() if self._duration else 0.0
        prio, dur, order = self._priority, self._duration, self._order
        r = self._next
        for b in block_ids:
            r += 1
            p = prio.get(b)
            if p is None:
                order[b] = r
                continue
            self._heap.push(b, p, r)
            self._heap_rel[b] = r
            d = dur.get(b)
            if d is not None:
                self._expiring.push(b, now + d, r)
        self._next = r

    def remove(self, block_id: int) -> None:
        if self._order.pop(block_id, None) is None:
            del self._heap_rel[block_id]  # KeyError: not evictable
            self._heap.discard(block_id)
            if self._expiring:
                self._expiring.discard(block_id)

    def remove_many(self, block_ids: Iterable[int]) -> None:
        if self._heap_rel:
            remove = self.remove
            for b in block_ids:
                remove(b)
            return
        order = self._order
        for b in block_ids:
            del order[b]

    def pop_victim(self) -> int:
        return self.pop_victims(1)[0]

    def pop_victims(self, n: int) -> list[int]:
        order = self._order
        if n > len(order) + len(self._heap_rel):
            raise self._no_victim()
        if self._expiring:
            self._expire(self.clock())
        if not self._heap_rel:
            popitem = order.popitem
            return [popitem(False)[0] for _ in range(n)]
        heap, heap_rel, default = self._heap, self._heap_rel, self.default_priority
        out: list[int] = []
        for _ in range(n):
            top = heap.top_key()
            if top is None or (order and (default, next(iter(order.values()))) < top):
                out.append(order.popitem(False)[0])
            else:
                b = heap.pop()
                del heap_rel[b]
                out.append(b)
        if self._expiring:
            discard = self._expiring.discard
            for b in out:
                discard(b)
        return out

    def peek_victims(self, n: int) -> list[int]:
        if self._expiring:
            self._expire(self.clock())
        default = self.default_priority
        first = [((default, r), b) for b, r in islice(self._order.items(), n)]
        if not self._heap_rel:
            return [b for _, b in first]
        prio, rel = self._priority, self._heap_rel
        first += [((prio.get(b, default), rel[b]), b) for b in self._heap.peek(n)]
        first.sort()
        return [b for _, b in first[:n]]

    # -- lifecycle -----------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        self._cached.add(block_id)

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        self._forget(block_id)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._forget(block_id)

    def _forget(self, b: int) -> None:
        self._cached.discard(b)
        self._priority.pop(b, None)
        self._duration.pop(b, None)

    def __len__(self) -> int:
        return len(self._order) + len(self._heap_rel)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._order or block_id in self._heap_rel

    def reset(self) -> None:
        self._order.clear()
        self._heap.clear()
        self._heap_rel.clear()
        self._expiring.clear()
        self._cached.clear()
        self._priority.clear()
        self._duration.clear()


def check_cached_ids(block_ids: Iterable[int], cached: set[int]) -> Sequence[int]:
    """``block_ids`` as a list, each a cached block (KVInvalidInputError otherwise)."""
    if isinstance(block_ids, str | bytes) or not isinstance(block_ids, Iterable):
        raise KVInvalidInputError(f"block_ids must be a list of ints, got {block_ids!r}")
    ids = list(block_ids)
    for b in ids:
        if isinstance(b, bool) or not isinstance(b, int):
            raise KVInvalidInputError(f"block id {b!r} is not an int")
        if b not in cached:
            raise KVInvalidInputError(f"block {b} is not cached; only cached blocks can be set")
    return ids
