"""The block pool: the mechanism under every cache in this package.

A fixed number of blocks, each ``block_size`` token slots, addressed by an
integer id. Block metadata lives in flat per-field lists created once
(``ref_counts[b]``, ``pin_counts[b]``, ``block_hashes[b]``...), so the hot path
indexes lists and allocates no object per block.

Every block is in exactly one of three states::

      +--------+  allocate()   +--------+  release() to ref 0, has hash  +-----------+
      |  FREE  | ------------> | IN USE | -----------------------------> | EVICTABLE |
      | no hash|               | ref > 0|  <---------------------------- | ref 0     |
      +--------+               | or pin |        touch() (a cache hit)   | cached    |
          ^   ^                +--------+                                +-----------+
          |   |  release() to ref 0, no hash  |                                |
          |   +-------------------------------+           evict() / invalidate |
          +----------------------------------------------------------------------+
                       (allocate() takes FREE blocks first, then evicts in policy order,
                        handing the evicted block straight to the new owner)

* FREE blocks sit in ``free_queue`` (a deque: O(1) at both ends; initial
  order 0, 1, 2, ...; released blocks go to the back).
* EVICTABLE blocks are owned by the eviction policy (``eviction/``), which
  alone decides the order in which they are given up.
* ``cached`` maps block hash -> block id for every block that has a hash
  (IN USE or EVICTABLE). One block per hash: a second block computed for a
  hash that is already cached is not registered and returns to FREE when
  released.

The pool is not thread-safe; ``KVPool`` wraps it in a lock. Errors raised
here leave the pool unchanged (checks come before mutations): block ids
must be ints (not bools) in ``[0, num_blocks)``, block hashes hashable and
not ``None``, and each method checks the state it needs (``touch`` cached
blocks, ``release`` held ones...) before changing anything, with C-level
passes (``map``/``set``) so the checks stay cheap on the hot path.

Size: at most ``MAX_NUM_BLOCKS`` blocks; the bookkeeping costs about
``BOOKKEEPING_BYTES_PER_BLOCK`` bytes of host memory per block, and a pool
whose bookkeeping would not fit in the host's physical memory is refused
with ``KVConfigError`` before anything is allocated.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

from .block_pool_check import check_invariants as _check_invariants
from .block_pool_room import pool_full_error
from .block_pool_serve import serve as _serve
from .checks import (
    BOOKKEEPING_BYTES_PER_BLOCK,
    MAX_NUM_BLOCKS,
    check_block_ids,
    check_count,
    check_num_blocks,
)
from .errors import (
    KVInvalidInputError,
    KVNoVictimError,
    KVRefCountUnderflowError,
)
from .eviction import EvictionPolicy, LRUPolicy, make_policy
from .hashing import check_block_hashes
from .hooks import ignores_cached

__all__ = [
    "BOOKKEEPING_BYTES_PER_BLOCK",
    "MAX_NUM_BLOCKS",
    "BlockPool",
    "check_block_ids",
    "check_count",
    "check_num_blocks",
]


class BlockPool:
    """Fixed set of KV blocks with ref counts, pins, a hash map and a policy.

    Args:
        num_blocks: number of blocks (>= 1; >= 0 when ``growable``).
        block_size: token slots per block.
        policy: eviction policy name, enum, class or instance (default ``"lru"``).
        enable_caching: when False no block is ever registered under a hash.
        clock: monotonic seconds; the simulator injects its simulated clock.
        growable: start with ``num_blocks`` blocks and add new ones (ids
            ``num_blocks, num_blocks + 1...``) when an allocation finds too few
            free blocks, before evicting, up to ``max_num_blocks`` (``None``:
            unbounded; the policy's capacity is ``max_num_blocks``). A
            standalone ``PrefixCache`` counts its capacity in entries this way
            without preallocating them.
        max_num_blocks: the growable pool's cap.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        policy: str | EvictionPolicy = "lru",
        *,
        enable_caching: bool = True,
        clock: Callable[[], float] | None = None,
        growable: bool = False,
        max_num_blocks: int | None = None,
    ) -> None:
        if growable:
            num_blocks = check_count(num_blocks, "num_blocks")
            if max_num_blocks is not None:
                max_num_blocks = check_num_blocks(max_num_blocks)
        else:
            num_blocks = max_num_blocks = check_num_blocks(num_blocks)
        self.num_blocks = num_blocks
        self.growable = growable
        #: the most blocks the pool may hold (``None``: a growable pool without a cap)
        self.max_num_blocks = max_num_blocks
        self._initial_num_blocks = num_blocks
        self.block_size = check_count(block_size, "block_size", 1)
        self.enable_caching = enable_caching
        self.clock = clock or time.monotonic
        self.policy = make_policy(policy, self.clock)
        self.policy.set_capacity(max_num_blocks)
        self._policy_tracks_hits = self.policy.tracks_hits
        # hooks a policy does not override are skipped on the hot path
        kind = type(self.policy)
        self._policy_on_cached = kind.on_cached is not EvictionPolicy.on_cached
        self._policy_on_evicted = kind.on_evicted is not EvictionPolicy.on_evicted
        # a policy that refreshes blocks in place (LRU's move to the end) is cheaper
        # touched than taken out and put back (put_chain)
        self._policy_touches = kind.touch_many is not EvictionPolicy.touch_many
        #: the policy may refuse evictable blocks (TTL-protected, leaf-only): admission
        #: asks it how many victims it can give before anything is changed
        self.policy_may_refuse = kind.num_victims is not EvictionPolicy.num_victims
        self.hooks: list = []
        #: a plain LRU order ``serve`` may move directly (None: through the policy)
        self._lru_order = (
            self.policy.order
            if type(self.policy) is LRUPolicy and enable_caching and not growable
            else None
        )
        self.ref_counts: list[int] = [0] * num_blocks
        self.pin_counts: list[int] = [0] * num_blocks
        self.block_hashes: list[Hashable | None] = [None] * num_blocks
        self.parent_ids: list[int] = [-1] * num_blocks
        self.free_queue: deque[int] = deque(range(num_blocks))
        self.cached: dict[Hashable, int] = {}
        self._num_pinned = 0  # blocks with pin count > 0 (release skips pin checks at 0)
        # counters (monotonic until reset)
        self.num_evictions = 0
        self.num_cached_total = 0
        #: hashes dropped, by reason ("capacity", "explicit", "invalidate", "clear"...)
        self.evictions_by_reason: dict[str, int] = {}

    # -- sizes ---------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks with no owner and no hash."""
        return len(self.free_queue)

    @property
    def num_evictable(self) -> int:
        """Cached blocks with ref count 0 and no pin."""
        return len(self.policy)

    @property
    def num_available(self) -> int:
        """Blocks an allocation could get now (free + evictable)."""
        return len(self.free_queue) + len(self.policy)

    @property
    def num_used(self) -> int:
        """Blocks in use (referenced or pinned)."""
        return self.num_blocks - len(self.free_queue) - len(self.policy)

    @property
    def num_cached(self) -> int:
        """Blocks registered under a hash (in use or evictable)."""
        return len(self.cached)

    @property
    def growth_room(self) -> int:
        """Blocks a growable pool may still add (0 for a fixed pool)."""
        if not self.growable:
            return 0
        cap = MAX_NUM_BLOCKS if self.max_num_blocks is None else self.max_num_blocks
        return cap - self.num_blocks

    def _grow(self, n: int) -> None:
        """Add ``n`` FREE blocks at the end of the id range (the caller checked the room)."""
        old = self.num_blocks
        self.num_blocks = old + n
        self.ref_counts += [0] * n
        self.pin_counts += [0] * n
        self.block_hashes += [None] * n
        self.parent_ids += [-1] * n
        self.free_queue.extend(range(old, old + n))

    # -- prefix lookup -------------------------------------------------------
    def match_prefix(self, block_hashes: Sequence[Hashable]) -> list[int]:
        """Ids of the leading run of cached blocks (stops at the first miss). No side effect."""
        try:
            out: list[int | None] = list(map(self.cached.get, block_hashes))  # one C pass
        except TypeError:  # an unhashable hash (or not a sequence): the full check says which
            check_block_hashes(block_hashes)
            raise  # pragma: no cover - check_block_hashes raises first
        if None in out:
            del out[out.index(None) :]
        return cast("list[int]", out)  # the None and all after it are gone

    def num_evictable_among(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` are evictable now (a hit on them shrinks the pool's supply)."""
        block_ids = self.check_block_ids(block_ids)
        ref = self.ref_counts
        if not self._num_pinned:  # common case: count zeros in one C pass
            return list(map(ref.__getitem__, block_ids)).count(0)
        pins = self.pin_counts
        return sum(1 for b in block_ids if not ref[b] and not pins[b])

    def evictable_among(self, block_ids: Sequence[int]) -> list[int]:
        """Those of ``block_ids`` that are evictable now (no reference, no pin, cached)."""
        ref, pins = self.ref_counts, self.pin_counts
        return [b for b in block_ids if not ref[b] and not pins[b]]

    def check_block_ids(self, block_ids: Any, name: str = "block_ids") -> list[int]:
        """``block_ids`` as a list of ints in range, or a typed error (C-level passes)."""
        return check_block_ids(block_ids, self.num_blocks, name)

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on each (cached) block; evictable ones leave the policy."""
        block_ids = self.check_block_ids(block_ids)
        if None in map(self.block_hashes.__getitem__, block_ids):
            raise KVInvalidInputError("touch: only cached blocks can be hit (one has no hash)")
        self._take(block_ids)

    def _take(self, block_ids: list[int]) -> None:
        """``touch`` once its input is checked (``serve`` passes its own hits)."""
        ref = self.ref_counts
        pins = self.pin_counts if self._num_pinned else None
        evictable: list[int] = []
        for b in block_ids:
            r = ref[b]
            if not r and (pins is None or not pins[b]):
                evictable.append(b)
            ref[b] = r + 1
        if evictable:
            self.policy.remove_many(evictable)
        if self._policy_tracks_hits:
            on_hit = self.policy.on_hit
            for b in block_ids:
                on_hit(b)

    serve = _serve  # match, touch, allocate, cache and release in one pass

    # -- allocation ----------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """``num_blocks`` blocks with ref count 1: free ones first, then evicted ones.

        Raises:
            KVPoolFullError: not enough free + evictable blocks (nothing changed).
            KVNoVictimError: the policy refuses some evictable blocks (nothing changed).
        """
        num_blocks = check_count(num_blocks, "num_blocks")
        free_q = self.free_queue
        if num_blocks <= len(free_q):
            out = [free_q.popleft() for _ in range(num_blocks)]
        else:
            out = self._take_short(num_blocks)
        ref = self.ref_counts
        for b in out:
            ref[b] = 1
        return out

    def _take_short(self, num_blocks: int) -> list[int]:
        """``num_blocks`` blocks when fewer are free: every free one, new ones (growable),
        then victims in policy order; checked before anything changes."""
        free_q = self.free_queue
        num_free = len(free_q)
        grow = min(num_blocks - num_free, self.growth_room) if self.growable else 0
        if num_blocks > num_free + grow + len(self.policy):
            raise pool_full_error(self, num_blocks, num_free + grow, len(self.policy))
        # evict first: a policy that cannot give enough victims (a leaf-only
        # constraint) raises KVNoVictimError with the free queue untouched
        victims = self._evict_many(num_blocks - num_free - grow, "capacity")
        if grow:
            self._grow(grow)
        out = list(free_q)
        free_q.clear()
        out += victims
        return out

    def _evict_many(self, n: int, reason: str) -> list[int]:
        """Pop ``n`` victims in policy order and drop their hashes (caller checked ``n``)."""
        if n <= 0:
            return []
        victims = self.policy.pop_victims(n)
        cached = self.cached
        hashes = self.block_hashes
        parents = self.parent_ids
        evicted_hashes = [hashes[b] for b in victims]
        for b, h in zip(victims, evicted_hashes):
            del cached[h]
            hashes[b] = None
            parents[b] = -1
        self.num_evictions += n
        by = self.evictions_by_reason
        by[reason] = by.get(reason, 0) + n
        if self._policy_on_evicted:
            on_evicted = self.policy.on_evicted
            for b, h in zip(victims, evicted_hashes):
                on_evicted(b, h)
        if self.hooks:
            self._emit_evicted(victims, evicted_hashes, reason)
        return victims

    def _emit_evicted(self, block_ids: list[int], hashes: list, reason: str) -> None:
        """One ``on_evict_many`` per hook (per-block ``on_evict`` for hooks without it)."""
        now = self.clock()
        for hook in self.hooks:
            many = getattr(hook, "on_evict_many", None)
            if many is not None:
                many(block_ids, hashes, reason, now)
            else:
                for b, h in zip(block_ids, hashes):
                    hook.on_evict(b, h, reason, now)

    def _emit_cached(self, block_ids: Sequence[int], block_hashes: Sequence, runs: list) -> None:
        """``on_blocks_cached`` once per run ``[a, z)`` of consecutive newly cached positions,
        to the hooks that take a cached-block event (``hooks.ignores_cached``)."""
        hooks = [h for h in self.hooks if not ignores_cached(type(h))]
        if not hooks:
            return
        now = self.clock()
        for a, z in runs:
            ids = block_ids[a:z]  # a list's slice is a new list: no second copy
            hs = block_hashes[a:z]
            if type(ids) is not list:
                ids = list(ids)
            if type(hs) is not list:
                hs = list(hs)
            parent = block_hashes[a - 1] if a > 0 else None
            for hook in hooks:
                many = getattr(hook, "on_blocks_cached", None)
                if many is not None:
                    many(ids, hs, parent, now)
                else:
                    ph = parent
                    for b, h in zip(ids, hs):
                        hook.on_block_cached(b, h, ph, now)
                        ph = h

    def evict(self, num_blocks: int, reason: str = "explicit") -> list[int]:
        """Evict up to ``num_blocks`` evictable blocks into the free queue; their ids in order.

        A policy that refuses some evictable blocks (TTL-protected, leaf-only)
        gives what it can now (``policy.num_victims``), in one batch.
        """
        num_blocks = check_count(num_blocks, "num_blocks")
        n = min(num_blocks, len(self.policy))
        if n and self.policy_may_refuse:
            n = self.policy.num_victims(n)
        try:
            out = self._evict_many(n, reason)
        except KVNoVictimError:
            # a custom policy that refuses blocks without saying so in num_victims:
            # take what it gives, one at a time (each pop is all or nothing)
            out = []
            while len(out) < n:
                try:
                    out += self._evict_many(1, reason)
                except KVNoVictimError:
                    break
        self.free_queue.extend(out)
        return out

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block, tail-first.

        Blocks reaching ref 0 become evictable when cached (in release order,
        so a request's last block is the first a recency policy gives up) and
        free otherwise.

        Raises:
            KVRefCountUnderflowError: a block is not held (as often as listed);
                nothing is released then.
        """
        block_ids = self.check_block_ids(block_ids)
        ref = self.ref_counts
        if 0 in map(ref.__getitem__, block_ids):
            b = next(b for b in block_ids if not ref[b])
            raise KVRefCountUnderflowError(f"block {b} released with ref count 0")
        if len(set(block_ids)) != len(block_ids):
            for b, k in Counter(block_ids).items():
                if ref[b] < k:
                    raise KVRefCountUnderflowError(
                        f"block {b} released {k}x in one call but held {ref[b]}x"
                    )
        self._drop(block_ids)

    def _drop(self, block_ids: list[int]) -> None:
        """``release`` once its input is checked (``serve`` passes the blocks it holds)."""
        ref = self.ref_counts
        hashes = self.block_hashes
        free_append = self.free_queue.append
        evictable: list[int] = []
        ev_append = evictable.append
        pins = self.pin_counts if self._num_pinned else None
        for b in reversed(block_ids):
            r = ref[b] - 1
            ref[b] = r
            if r:
                if r < 0:  # only reachable through a bookkeeping bug: KVPool validates handles
                    ref[b] = 0
                    raise KVRefCountUnderflowError(f"block {b} released with ref count 0")
                continue
            if pins is not None and pins[b]:
                continue
            if hashes[b] is None:
                free_append(b)
            else:
                ev_append(b)
        if evictable:
            self.policy.add_many(evictable)

    # -- caching -------------------------------------------------------------
    def cache_blocks(
        self, block_ids: Sequence[int], block_hashes: Sequence[Hashable], start: int = 0
    ) -> int:
        """Register ``block_ids[i]`` under ``block_hashes[i]`` for ``i >= start``.

        The blocks must be in use (their KV written). A hash that is already
        cached keeps its block (one block per hash). Returns how many blocks
        were newly registered.

        Raises:
            KVInvalidTypeError / KVInvalidInputError: a hash that is unhashable or
                ``None``, more hashes than blocks, a bad ``start``, or a block to
                register that is free. Nothing is registered then.
        """
        block_hashes = check_block_hashes(block_hashes)
        block_ids = self.check_block_ids(block_ids)
        start = check_count(start, "start")
        if start > len(block_ids):
            raise KVInvalidInputError(f"cache_blocks: start={start} beyond {len(block_ids)} blocks")
        if len(block_hashes) > len(block_ids):
            raise KVInvalidInputError(
                f"cache_blocks: {len(block_hashes)} hashes for {len(block_ids)} blocks"
            )
        todo = block_ids[start : len(block_hashes)]
        if 0 in map(self.ref_counts.__getitem__, todo):
            pins = self.pin_counts
            hashes_ = self.block_hashes
            for b in todo:  # a FREE block never gets a hash (cached ones are skipped below)
                if not self.ref_counts[b] and not pins[b] and hashes_[b] is None:
                    raise KVInvalidInputError(
                        f"block {b} is free; only blocks held (their KV written) are cached"
                    )
        if not self.enable_caching:
            return 0
        return self._register(block_ids, block_hashes, start)

    def _register(self, block_ids: list[int], block_hashes: list, start: int) -> int:
        """``cache_blocks`` once its input is checked (``serve`` passes its own)."""
        cached = self.cached
        hashes = self.block_hashes
        parents = self.parent_ids
        on_cached = self.policy.on_cached if self._policy_on_cached else None
        # runs [a, z) of consecutive newly cached positions, for the hooks
        runs: list[tuple[int, int]] = []
        run_a = run_z = -1
        n = 0
        prev = block_ids[start - 1] if start > 0 else -1
        for i in range(start, len(block_hashes)):
            b = block_ids[i]
            h = block_hashes[i]
            if hashes[b] is None and h not in cached:
                cached[h] = b
                hashes[b] = h
                parents[b] = prev
                if on_cached is not None:
                    on_cached(b, h, prev)
                n += 1
                if i != run_z:
                    if run_z >= 0:
                        runs.append((run_a, run_z))
                    run_a = i
                run_z = i + 1
            prev = cached.get(h, b)  # the block that holds h: a duplicate is no parent
        self.num_cached_total += n
        if n and self.hooks:
            runs.append((run_a, run_z))
            self._emit_cached(block_ids, block_hashes, runs)
        return n

    def uncache(self, block_id: int, reason: str = "explicit") -> bool:
        """Drop ``block_id``'s hash (invalidate). An evictable block becomes free."""
        (block_id,) = self.check_block_ids([block_id], "block_id")
        h = self.block_hashes[block_id]
        if h is None:
            return False
        if block_id in self.policy:
            self.policy.remove(block_id)
            self.free_queue.append(block_id)
        del self.cached[h]
        self.block_hashes[block_id] = None
        self.parent_ids[block_id] = -1
        self.policy.on_removed(block_id, h)
        by = self.evictions_by_reason
        by[reason] = by.get(reason, 0) + 1
        if self.hooks:
            self._emit_evicted([block_id], [h], reason)
        return True

    # -- pins ----------------------------------------------------------------
    def pin(self, block_ids: Sequence[int]) -> None:
        """Pin blocks: a pinned block is never evicted, even at ref count 0."""
        block_ids = self.check_block_ids(block_ids)
        pins = self.pin_counts
        ref = self.ref_counts
        for b in block_ids:
            if not pins[b] and not ref[b] and self.block_hashes[b] is None:
                raise KVInvalidInputError(
                    f"block {b} is free; only held or cached blocks can be pinned"
                )
        for b in block_ids:
            if not pins[b]:
                self._num_pinned += 1
                if not ref[b]:
                    self.policy.remove(b)
            pins[b] += 1

    def unpin(self, block_ids: Sequence[int]) -> None:
        block_ids = self.check_block_ids(block_ids)
        pins = self.pin_counts
        for b in block_ids:
            if pins[b] <= 0:
                raise KVRefCountUnderflowError(f"block {b} unpinned more often than pinned")
        if len(set(block_ids)) != len(block_ids):  # a repeated id unpins that block twice
            for b, k in Counter(block_ids).items():
                if pins[b] < k:
                    raise KVRefCountUnderflowError(
                        f"block {b} unpinned {k}x in one call but pinned {pins[b]}x"
                    )
        for b in block_ids:
            pins[b] -= 1
            if not pins[b]:
                self._num_pinned -= 1
            if not pins[b] and not self.ref_counts[b]:
                if self.block_hashes[b] is None:
                    self.free_queue.append(b)
                else:
                    self.policy.add(b)

    # -- whole pool ----------------------------------------------------------
    def reset(self) -> None:
        """Everything free, nothing cached, counters zeroed (a growable pool shrinks back
        to its initial size)."""
        n = self.num_blocks = self._initial_num_blocks
        self.ref_counts[:] = [0] * n
        self.pin_counts[:] = [0] * n
        self.block_hashes[:] = [None] * n
        self.parent_ids[:] = [-1] * n
        self.free_queue = deque(range(n))
        self.cached.clear()
        self._num_pinned = 0
        self.policy.reset()
        self.num_evictions = 0
        self.num_cached_total = 0
        self.evictions_by_reason = {}
        if self.hooks:
            now = self.clock()
            for hook in self.hooks:
                hook.on_cleared(now)

    check_invariants = _check_invariants  # the structural invariants, O(num_blocks)

    def __repr__(self) -> str:
        return (
            f"BlockPool(blocks={self.num_blocks}, free={self.num_free}, "
            f"evictable={self.num_evictable}, used={self.num_used}, policy={self.policy.name})"
        )
