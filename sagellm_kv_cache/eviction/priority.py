"""Retention priorities with an optional duration (TensorRT-LLM's KV cache retention).

Key: ``(retention priority, release number)``, smallest first, where an
expired duration has put the block back at the default priority with the
release number of its expiry.

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

Expiry never scans: running durations are the keyed base's timers, due in
expiry order (ties by release order) at the start of every add, pop and
peek and of ``set_retention``, with the policy clock (``clock`` argument;
the pool passes its own).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

from ..errors import KVConfigError, KVInvalidInputError
from .keyed import Key, KeyedPolicy, check_cached_ids, check_seconds

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


class PriorityPolicy(KeyedPolicy):
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
        self._lane_k0 = self.default_priority  # releases at the default come in key order
        self._cached: set[int] = set()
        self._priority: dict[int, int] = {}  # cached block -> priority, when not the default
        self._duration: dict[int, float] = {}  # cached block -> duration_s of its priority

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
        if duration_s is not None:
            duration_s = check_seconds(duration_s, "duration_s")
        ids = check_cached_ids(block_ids, self._cached)
        self._run_timers()
        now = self.clock()
        due = None
        if priority != self.default_priority and duration_s is not None:
            due = now + duration_s
        for b in ids:
            self._duration.pop(b, None)
            if priority == self.default_priority:
                self._priority.pop(b, None)
            else:
                self._priority[b] = priority
                if duration_s is not None:
                    self._duration[b] = duration_s
            r = self._rel.get(b)
            if r is not None:  # evictable: re-filed at its release place
                self._refile(b)
                if due is not None:
                    self._timers.push(b, due, r)
                else:
                    self._timers.discard(b)

    def priority_of(self, block_id: int) -> int:
        """The priority ``block_id`` is filed under now (expired durations applied)."""
        self._run_timers()
        return self._priority.get(block_id, self.default_priority)

    # -- keyed policy ----------------------------------------------------------
    def _key(self, block_id: int, release: int) -> Key:
        return self._priority.get(block_id, self.default_priority), release

    def _file(self, block_id: int, release: int) -> None:
        self._enqueue(block_id, self._priority.get(block_id, self.default_priority), release)
        d = self._duration.get(block_id)
        if d is not None:
            self._timers.push(block_id, self.clock() + d, release)

    def _on_timer(self, block_id: int) -> None:
        # back to the default priority, as if released now
        self._forget_priority(block_id)
        self._next = r = self._next + 1
        self._rel[block_id] = r
        self._refile(block_id)

    def _forget_priority(self, b: int) -> None:
        self._priority.pop(b, None)
        self._duration.pop(b, None)

    # -- lifecycle -----------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        self._cached.add(block_id)

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        self._cached.discard(block_id)
        self._forget_priority(block_id)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._cached.discard(block_id)
        self._forget_priority(block_id)

    def reset(self) -> None:
        super().reset()
        self._cached.clear()
        self._priority.clear()
        self._duration.clear()
