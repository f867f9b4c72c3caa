"""Keyed policies: the victim is the evictable block with the smallest key.

A keyed policy states one thing, the key of a block at the moment it becomes
evictable (``_key(b, r)``, ``r`` being its release number: 1, 2, 3... in the
order the pool releases blocks, so a request's blocks, released tail-first,
number its suffix before its prefix). ``key(b)`` answers it for an evictable
block; the victim is the block with the smallest key, and
``peek_victims(n)`` lists the evictable blocks sorted by it.

Mechanism, shared by every keyed policy: the evictable blocks sit in a
lazy-deletion heap (``_lazyheap.LazyHeap``) under their key; a subclass whose
key changes while a block is evictable (a hit under LFU, a new retention
priority) re-files the block (``_refile``). Blocks may also carry a timer
(``_timers``: a second lazy heap by due time, ties by release number), whose
``_on_timer(b)`` runs, in due order, before every add, pop and peek once the
policy clock reaches it (a TTL ending, a retention duration running out);
because every release runs the due timers first, the order is the same
whenever they run. add, remove and pop are O(log n) amortized, a peek of
``k`` victims O(k log n) (a best-first walk down the heap).

Two fast paths, each chosen by a class attribute and each tested against the
plain mechanism on random event sequences (``tests/test_eviction_policies_keyed.py``),
kept because ``benchmarks/bench_eviction.py`` measured the plain heap 1.5-2x
slower than the structures they replace on the pool's replay:

* the *lane* (``_lane_k0``): blocks keyed ``(_lane_k0, x)`` that arrive with
  ``x`` past the lane's last (most releases: the default priority, an
  unprotected TTL block, a never-hit LFU block, every MRU release) are
  appended to an ``OrderedDict`` instead of the heap, and a pop takes the
  smaller of the two fronts: O(1) per event in the common case;
* *kept entries* (``_keep_entries``, FIFO): when a block's key is fixed while
  it is cached, its entry stays queued while the block is in use (dormant;
  a pop or a peek that meets it drops it), so a hit and a release re-file
  nothing; FIFO queues a block as it is cached, in key order, on the lane.

Subclasses: ``FIFOPolicy``, ``MRUPolicy``, ``LFUPolicy``, ``PriorityPolicy``,
``TTLPolicy``; each docstring states its key and its source.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator
from itertools import islice

from ..errors import KVInvalidInputError
from ._lazyheap import LazyHeap
from .base import EvictionPolicy

__all__ = ["Key", "KeyedPolicy", "check_cached_ids", "check_seconds"]

Key = tuple[float, float]


class KeyedPolicy(EvictionPolicy):
    """Smallest ``key(b)`` first, over a lazy heap and a release-order lane.

    Subclasses define ``_key`` and may set ``_lane_k0`` (the first key part of the
    blocks most releases file, e.g. the default priority) and ``_lane_desc``.
    """

    #: blocks keyed ``(_lane_k0, x)`` with ``x`` past the lane's last go to the lane
    _lane_k0: float | None = None
    #: the lane's ``x`` falls at each append (MRU's ``-release``) instead of rising
    _lane_desc = False
    #: a block's key is fixed while it is cached (FIFO): its entry may stay queued while
    #: the block is in use (a dormant entry, dropped when a pop or a peek meets it), so
    #: a release re-files nothing when the entry is still there
    _keep_entries = False

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self._heap = LazyHeap()  # eligible evictable blocks off the lane, by key
        # eligible evictable blocks keyed (_lane_k0, x), appended in key order: block -> x
        self._lane: OrderedDict[int, float] = OrderedDict()
        self._lane_last = math.inf if self._lane_desc else -math.inf
        self._timers = LazyHeap()  # evictable blocks with a timer: (due time, release number)
        self._rel: dict[int, int] = {}  # evictable block -> release number
        self._evictable = self._rel  # len / in (cleared in place, never rebound)
        self._next = 0  # last release number given
        self._plain_file = type(self)._file is KeyedPolicy._file

    # -- what a subclass states ----------------------------------------------
    def _key(self, block_id: int, release: int) -> Key:
        """The key of ``block_id`` released with release number ``release`` (no side effect
        on cached blocks)."""
        raise NotImplementedError

    def _file(self, block_id: int, release: int) -> None:
        """File a block that just became evictable (a subclass may set a timer instead)."""
        self._enqueue(block_id, *self._key(block_id, release))

    def _on_timer(self, block_id: int) -> None:
        """``block_id``'s timer came due (it is evictable; the timer is gone)."""
        raise NotImplementedError

    # -- public --------------------------------------------------------------
    def key(self, block_id: int) -> Key:
        """The key an evictable block is filed under now (due timers run first); the block
        with the smallest key is the next victim. KeyError when it is not evictable."""
        self._run_timers()
        return self._key(block_id, self._rel[block_id])

    # -- the two queues --------------------------------------------------------
    def _enqueue(self, b: int, k0: float, k1: float) -> None:
        last = self._lane_last
        if k0 == self._lane_k0 and (k1 < last if self._lane_desc else k1 > last):
            self._lane[b] = self._lane_last = k1
        else:
            self._heap.push(b, k0, k1)

    def _dequeue(self, b: int) -> None:
        if self._lane.pop(b, None) is None:
            self._heap.discard(b)

    def _refile(self, block_id: int) -> None:
        """Re-key an evictable block after its key changed (keeps its release number)."""
        self._dequeue(block_id)
        self._enqueue(block_id, *self._key(block_id, self._rel[block_id]))

    def _num_eligible(self) -> int:
        if self._keep_entries:
            return len(self._rel)
        return len(self._lane) + len(self._heap)

    def _run_timers(self) -> None:
        timers = self._timers
        if not timers:
            return
        now = self.clock()
        top = timers.top_key()
        while top is not None and top[0] <= now:
            self._on_timer(timers.pop())
            top = timers.top_key()

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        self.add_many((block_id,))

    def add_many(self, block_ids: Iterable[int]) -> None:
        self._run_timers()
        rel = self._rel
        r = self._next
        if self._plain_file:  # _enqueue inlined: no call per block
            key, lane, lane_k0, last = self._key, self._lane, self._lane_k0, self._lane_last
            desc, queued = self._lane_desc, self._keep_entries
            heap = self._heap
            items = []
            for b in block_ids:
                r += 1
                rel[b] = r
                if queued and (b in lane or b in heap):
                    continue  # its entry stayed (dormant) while it was in use
                k0, k1 = key(b, r)
                if k0 == lane_k0 and (k1 < last if desc else k1 > last):
                    lane[b] = last = k1
                else:
                    items.append((b, k0, k1))
            self._lane_last = last
            if items:
                self._heap.push_many(items)
        else:
            file = self._file
            for b in block_ids:
                r += 1
                rel[b] = r
                file(b, r)
        self._next = r

    def remove(self, block_id: int) -> None:
        del self._rel[block_id]  # KeyError: not evictable
        if not self._keep_entries:
            self._dequeue(block_id)
        if self._timers:
            self._timers.discard(block_id)

    def remove_many(self, block_ids: Iterable[int]) -> None:
        ids = block_ids if isinstance(block_ids, list) else list(block_ids)
        rel, pop = self._rel, self._lane.pop
        if self._keep_entries:
            for b in ids:
                del rel[b]  # KeyError: not evictable (the blocks before it are out)
            return
        off_lane = []
        for b in ids:
            del rel[b]  # KeyError: not evictable (the blocks before it are out)
            if pop(b, None) is None:
                off_lane.append(b)
        if off_lane:
            self._heap.discard_many(off_lane)
        if self._timers:
            discard = self._timers.discard
            for b in ids:
                discard(b)

    def pop_victim(self) -> int:
        return self.pop_victims(1)[0]

    def pop_victims(self, n: int) -> list[int]:
        self._run_timers()
        lane, heap, desc = self._lane, self._heap, self._lane_desc
        if n > self._num_eligible():
            raise self._no_victim()
        only = self._rel if self._keep_entries else None  # dormant entries are no victims
        if only is None and not heap:
            popitem = lane.popitem
            out = [popitem(desc)[0] for _ in range(n)]
        elif only is None and not lane:
            out = heap.pop_many(n)
        else:  # merge the two fronts: runs of lane blocks, then heap blocks below the lane
            out = []
            k0: float = self._lane_k0 or 0  # the lane holds blocks only when it is set
            popitem = lane.popitem
            while len(out) < n:
                top = heap.top_key()
                while lane and len(out) < n:
                    head = next(reversed(lane)) if desc else next(iter(lane))
                    if top is not None and (k0, lane[head]) > top:
                        break
                    x = popitem(desc)[0]
                    if only is None or x in only:
                        out.append(x)
                if len(out) < n and top is not None:
                    bound = (math.inf, math.inf)
                    if lane:
                        bound = (k0, lane[next(reversed(lane)) if desc else next(iter(lane))])
                    out += heap.pop_below(bound, n - len(out), only)
        rel = self._rel
        for b in out:
            del rel[b]
        if self._timers:
            discard = self._timers.discard
            for b in out:
                discard(b)
        return out

    def peek_victims(self, n: int) -> list[int]:
        self._run_timers()
        if not self._heap and not self._keep_entries:
            lane = self._lane
            return list(islice(reversed(lane) if self._lane_desc else lane, n))
        return self.peek_cascade(n, None)

    def peek_cascade(self, n: int, after: Callable[[int], int] | None) -> list[int]:
        self._run_timers()
        virtual_add = None
        if after is not None:
            cascade = after
            r = self._next
            protected = self.is_protected

            def virtual_add(b: int) -> tuple[float, float, int] | None:
                nonlocal r
                a = cascade(b)
                if a < 0 or protected(a):
                    return None
                r += 1
                k0, k1 = self._key(a, r)
                return k0, k1, a

        only = self._rel if self._keep_entries else None
        dormant: list[int] = []  # dormant lane entries the walk met: dropped after it
        out = self._heap.peek(n, virtual_add, self._lane_entries(only, dormant), only)
        for b in dormant:
            del self._lane[b]
        return out

    def _lane_entries(
        self, only: Collection[int] | None, dormant: list[int]
    ) -> Iterator[tuple[float, float, int]]:
        """The lane as ``(k0, k1, b)`` in key order (blocks not in ``only`` go to
        ``dormant`` instead)."""
        k0 = self._lane_k0 or 0
        items = reversed(self._lane.items()) if self._lane_desc else iter(self._lane.items())
        for b, x in items:
            if only is None or b in only:
                yield k0, x, b
            else:
                dormant.append(b)

    def reset(self) -> None:
        self._heap.clear()
        self._lane.clear()
        self._lane_last = math.inf if self._lane_desc else -math.inf
        self._timers.clear()
        self._rel.clear()
        self._next = 0


def check_cached_ids(block_ids: Iterable[int], cached: Collection[int]) -> list[int]:
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


def check_seconds(value: object, what: str) -> float:
    """``value`` as a positive finite number of seconds (KVInvalidInputError otherwise)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value > 0 and math.isfinite(value))
    ):
        raise KVInvalidInputError(f"{what} must be a positive number, got {value!r}")
    return float(value)
