"""Time-pinned prefixes (explicit prompt caching with a TTL), LRU otherwise.

Definition (explicit prompt-cache control as offered by LLM APIs, e.g.
Anthropic's ``cache_control: {"type": "ephemeral", "ttl": ...}``: a marked
prefix stays cached for at least its TTL, each new mark refreshing it):
a caller protects cached blocks for ``ttl_s`` seconds with
``pin_for(block_ids, ttl_s)``. Until its protection expires a block is never
chosen as a victim, whatever its state; unprotected evictable blocks go in
LRU order (release order, as ``LRUPolicy``: a request's blocks are released
tail-first). A block whose protection has expired takes its plain LRU place
again (the place its last release gave it), as if it had never been pinned.

A new ``pin_for`` on a protected block keeps the later of the two expiry
times (a shorter TTL never cuts an existing protection short);
``unprotect(block_ids)`` ends it now. Protection belongs to the cached
content: it is forgotten when the block's hash is evicted or dropped.

``len(policy)`` counts every evictable block, protected or not (the pool's
accounting); ``num_eligible()`` counts those that can be victims now. When
fewer than ``n`` are eligible, ``pop_victims(n)`` raises ``KVNoVictimError``
and changes nothing, so the pool's allocation fails cleanly.

Reaching it: ``block_pool.policy.pin_for(ids, ttl_s)`` or, on a ``KVPool``,
``kv_pool.policy.pin_for(handle.block_ids, ttl_s)`` once the blocks are
cached.

Implementation: unprotected evictable blocks released in order sit in an
``OrderedDict`` (block -> release number), so with no protection in play the
policy is an LRU (add, remove, pop O(1)); a block that becomes eligible out of
release order (its protection expired or was ended while it was evictable)
goes to a small lazy-deletion heap keyed by release number, and a pop takes
the older of the two fronts. Protected evictable blocks sit in a heap ordered
by expiry time, moved to the eligible side lazily at ``pop``/``peek``: expiry
never scans, every event is O(log n) amortized, with the policy clock
(``clock`` argument), and the clock is not read while no block is protected.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable
from itertools import count, islice

from ..errors import KVInvalidInputError, KVNoVictimError
from ._lazyheap import LazyHeap
from .base import EvictionPolicy
from .priority import check_cached_ids

__all__ = ["TTLPolicy"]


class TTLPolicy(EvictionPolicy):
    name = "ttl"
    description = "LRU, but blocks pinned with pin_for(ids, ttl_s) are never victims until expiry"

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        # eligible (unprotected) evictable blocks: in release order, or out of order
        self._order: OrderedDict[int, int] = OrderedDict()  # block -> release number
        self._late = LazyHeap()  # (release number,) of eligible blocks out of order
        self._late_rel: dict[int, int] = {}  # block in _late -> release number
        self._guarded = LazyHeap()  # protected evictable: (expiry time, release number)
        self._guarded_rel: dict[int, int] = {}  # block in _guarded -> release number
        self._until: dict[int, float] = {}  # cached block -> protection expiry
        self._cached: set[int] = set()
        self._next = 0

    # -- public API ----------------------------------------------------------
    def pin_for(self, block_ids: Iterable[int], ttl_s: float) -> None:
        """Protect cached blocks from eviction for ``ttl_s`` seconds from now.

        Raises:
            KVInvalidInputError: ``ttl_s`` not a positive finite number, or a
                block that is not cached (nothing is changed then).
        """
        if (
            isinstance(ttl_s, bool)
            or not isinstance(ttl_s, int | float)
            or not (ttl_s > 0 and math.isfinite(ttl_s))
        ):
            raise KVInvalidInputError(f"ttl_s must be a positive number, got {ttl_s!r}")
        ids = check_cached_ids(block_ids, self._cached)
        until = self.clock() + ttl_s
        for b in ids:
            u = self._until.get(b)
            if u is None or u < until:
                self._until[b] = u = until
            r = self._take_eligible(b)
            if r is None:
                r = self._guarded_rel.get(b)
            if r is not None:
                self._guarded.push(b, u, r)
                self._guarded_rel[b] = r

    def unprotect(self, block_ids: Iterable[int]) -> None:
        """End the protection of cached blocks now (no-op for unprotected ones)."""
        ids = check_cached_ids(block_ids, self._cached)
        for b in ids:
            if self._until.pop(b, None) is not None and self._guarded.discard(b):
                self._make_eligible(b, self._guarded_rel.pop(b))

    def protected_until(self, block_id: int) -> float | None:
        """Expiry time of ``block_id``'s protection, None when it is not protected now."""
        u = self._until.get(block_id)
        return u if u is not None and u > self.clock() else None

    def num_eligible(self) -> int:
        """Evictable blocks that may be victims now (unprotected or expired)."""
        self._expire(self.clock())
        return len(self._order) + len(self._late_rel)

    def is_protected(self, block_id: int) -> bool:
        u = self._until.get(block_id)
        return u is not None and u > self.clock()

    def num_victims(self, limit: int, exclude: Collection[int] = ()) -> int:
        if self._guarded_rel:
            self._expire(self.clock())  # what pop_victims does first: no visible change
        order, late = self._order, self._late_rel
        n = len(order) + len(late)
        if exclude:
            n -= sum(1 for b in exclude if b in order or b in late)
        return limit if n >= limit else n

    # -- eligible set ---------------------------------------------------------
    def _take_eligible(self, b: int) -> int | None:
        """Drop ``b`` from the eligible blocks; its release number (None if not eligible)."""
        r = self._order.pop(b, None)
        if r is None:
            r = self._late_rel.pop(b, None)
            if r is not None:
                self._late.discard(b)
        return r

    def _make_eligible(self, b: int, r: int) -> None:
        """``b`` (release number ``r``) becomes eligible, at its release place."""
        order = self._order
        if not order or r > next(reversed(order.values())):
            order[b] = r  # still in release order: append
        else:
            self._late.push(b, r)
            self._late_rel[b] = r

    # -- expiry --------------------------------------------------------------
    def _expire(self, now: float) -> None:
        guarded = self._guarded
        top = guarded.top_key()
        while top is not None and top[0] <= now:
            b = guarded.pop()
            self._until.pop(b, None)
            self._make_eligible(b, self._guarded_rel.pop(b))
            top = guarded.top_key()

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        if self._until:
            self.add_many((block_id,))
        else:
            self._next = r = self._next + 1
            self._order[block_id] = r

    def add_many(self, block_ids: Iterable[int]) -> None:
        if not self._until:  # nothing protected: plain LRU appends
            c = count(self._next + 1)
            self._order.update(zip(block_ids, c))
            self._next = next(c) - 1
            return
        now = self.clock()
        until = self._until
        order = self._order
        r = self._next
        for b in block_ids:
            r += 1
            u = until.get(b)
            if u is not None:
                if u > now:
                    self._guarded.push(b, u, r)
                    self._guarded_rel[b] = r
                    continue
                del until[b]
            order[b] = r
        self._next = r

    def remove(self, block_id: int) -> None:
        if self._order.pop(block_id, None) is None:
            if block_id in self._late_rel:
                del self._late_rel[block_id]
                self._late.discard(block_id)
            else:
                del self._guarded_rel[block_id]  # KeyError: not evictable
                self._guarded.discard(block_id)

    def remove_many(self, block_ids: Iterable[int]) -> None:
        if self._late_rel or self._guarded_rel:
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
        if self._guarded_rel:
            self._expire(self.clock())
        order = self._order
        if n > len(order) + len(self._late_rel):
            raise self._no_victim()
        if not self._late_rel:
            popitem = order.popitem
            return [popitem(False)[0] for _ in range(n)]
        late, late_rel = self._late, self._late_rel
        out: list[int] = []
        for _ in range(n):
            top = late.top_key()
            if top is None or (order and next(iter(order.values())) < top[0]):
                out.append(order.popitem(False)[0])
            else:
                b = late.pop()
                del late_rel[b]
                out.append(b)
        return out

    def peek_victims(self, n: int) -> list[int]:
        if self._guarded_rel:
            self._expire(self.clock())
        first = list(islice(self._order.items(), n))
        if not self._late_rel:
            return [b for b, _ in first]
        rel = self._late_rel
        merged = first + [(b, rel[b]) for b in self._late.peek(n)]
        merged.sort(key=lambda e: e[1])
        return [b for b, _ in merged[:n]]

    # -- lifecycle -----------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        self._cached.add(block_id)

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        self._cached.discard(block_id)
        self._until.pop(block_id, None)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._cached.discard(block_id)
        self._until.pop(block_id, None)

    def _no_victim(self) -> KVNoVictimError:
        if not self._guarded_rel:
            return super()._no_victim()
        return KVNoVictimError(
            f"{self.name}: {len(self._guarded_rel)} evictable blocks are TTL-protected, "
            f"only {len(self._order) + len(self._late_rel)} can be evicted now"
        )

    def __len__(self) -> int:
        return len(self._order) + len(self._late_rel) + len(self._guarded_rel)

    def __contains__(self, block_id: object) -> bool:
        return (
            block_id in self._order or block_id in self._late_rel or block_id in self._guarded_rel
        )

    def reset(self) -> None:
        self._order.clear()
        self._late.clear()
        self._late_rel.clear()
        self._guarded.clear()
        self._guarded_rel.clear()
        self._until.clear()
        self._cached.clear()
