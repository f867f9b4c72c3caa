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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence

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
        self._heap = LazyHeap()  # evictable: (priority, release number)
        self._expiring = LazyHeap()  # evictable with a running timer: (expiry time, release number)
        self._rel: dict[int, int] = {}  # evictable block -> release number
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
            r = self._rel.get(b)
            if r is not None:
                self._heap.push(b, priority, r)
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
            self._next = r = self._next + 1
            self._rel[b] = r
            self._heap.push(b, self.default_priority, r)
            top = expiring.top_key()

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        now = self.clock()
        if self._expiring:
            self._expire(now)
        self._add(block_id, now)

    def add_many(self, block_ids: Iterable[int]) -> None:
        now = self.clock()
        if self._expiring:
            self._expire(now)
        for b in block_ids:
            self._add(b, now)

    def _add(self, b: int, now: float) -> None:
        self._next = r = self._next + 1
        self._rel[b] = r
        p = self._priority.get(b)
        if p is None:
            self._heap.push(b, self.default_priority, r)
            return
        self._heap.push(b, p, r)
        d = self._duration.get(b)
        if d is not None:
            self._expiring.push(b, now + d, r)

    def remove(self, block_id: int) -> None:
        del self._rel[block_id]
        self._heap.discard(block_id)
        if self._expiring:
            self._expiring.discard(block_id)

    def remove_many(self, block_ids: Iterable[int]) -> None:
        rel = self._rel
        ids = list(block_ids)
        for b in ids:
            del rel[b]
        self._heap.discard_many(ids)
        if self._expiring:
            discard = self._expiring.discard
            for b in ids:
                discard(b)

    def pop_victim(self) -> int:
        return self.pop_victims(1)[0]

    def pop_victims(self, n: int) -> list[int]:
        if n > len(self._rel):
            raise self._no_victim()
        if self._expiring:
            self._expire(self.clock())
        out = self._heap.pop_many(n)
        rel = self._rel
        for b in out:
            del rel[b]
        if self._expiring:
            discard = self._expiring.discard
            for b in out:
                discard(b)
        return out

    def peek_victims(self, n: int) -> list[int]:
        if self._expiring:
            self._expire(self.clock())
        return self._heap.peek(n)

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
        return len(self._rel)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._rel

    def reset(self) -> None:
        self._heap.clear()
        self._expiring.clear()
        self._rel.clear()
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
