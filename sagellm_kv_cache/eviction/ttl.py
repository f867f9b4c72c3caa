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
cached. Expiry never scans: protected evictable blocks sit in a heap ordered
by expiry time, moved to the LRU heap lazily at ``pop``/``peek``; every event
is O(log n) amortized, with the policy clock (``clock`` argument).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable

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
        self._rel: dict[int, int] = {}  # evictable block -> release number
        self._eligible = LazyHeap()  # unprotected evictable: (release number,)
        self._guarded = LazyHeap()  # protected evictable: (expiry time, release number)
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
            r = self._rel.get(b)
            if r is not None:
                self._eligible.discard(b)
                self._guarded.push(b, u, r)

    def unprotect(self, block_ids: Iterable[int]) -> None:
        """End the protection of cached blocks now (no-op for unprotected ones)."""
        ids = check_cached_ids(block_ids, self._cached)
        for b in ids:
            if self._until.pop(b, None) is not None and self._guarded.discard(b):
                self._eligible.push(b, self._rel[b])

    def protected_until(self, block_id: int) -> float | None:
        """Expiry time of ``block_id``'s protection, None when it is not protected now."""
        u = self._until.get(block_id)
        return u if u is not None and u > self.clock() else None

    def num_eligible(self) -> int:
        """Evictable blocks that may be victims now (unprotected or expired)."""
        self._expire(self.clock())
        return len(self._eligible)

    # -- expiry --------------------------------------------------------------
    def _expire(self, now: float) -> None:
        guarded = self._guarded
        top = guarded.top_key()
        while top is not None and top[0] <= now:
            b = guarded.pop()
            self._until.pop(b, None)
            self._eligible.push(b, top[1])
            top = guarded.top_key()

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        self._add(block_id, self.clock() if self._until else 0.0)

    def add_many(self, block_ids: Iterable[int]) -> None:
        now = self.clock() if self._until else 0.0
        for b in block_ids:
            self._add(b, now)

    def _add(self, b: int, now: float) -> None:
        self._next = r = self._next + 1
        self._rel[b] = r
        u = self._until.get(b)
        if u is not None:
            if u > now:
                self._guarded.push(b, u, r)
                return
            del self._until[b]
        self._eligible.push(b, r)

    def remove(self, block_id: int) -> None:
        del self._rel[block_id]
        if not self._eligible.discard(block_id):
            self._guarded.discard(block_id)

    def remove_many(self, block_ids: Iterable[int]) -> None:
        rel = self._rel
        eligible = self._eligible
        guarded = self._guarded
        for b in block_ids:
            del rel[b]
            if not eligible.discard(b):
                guarded.discard(b)

    def pop_victim(self) -> int:
        return self.pop_victims(1)[0]

    def pop_victims(self, n: int) -> list[int]:
        if self._guarded:
            self._expire(self.clock())
        if n > len(self._eligible):
            raise self._no_victim()
        out = self._eligible.pop_many(n)
        rel = self._rel
        for b in out:
            del rel[b]
        return out

    def peek_victims(self, n: int) -> list[int]:
        if self._guarded:
            self._expire(self.clock())
        return self._eligible.peek(n)

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
        if not self._guarded:
            return super()._no_victim()
        return KVNoVictimError(
            f"{self.name}: {len(self._guarded)} evictable blocks are TTL-protected, "
            f"only {len(self._eligible)} can be evicted now"
        )

    def __len__(self) -> int:
        return len(self._rel)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._rel

    def reset(self) -> None:
        self._rel.clear()
        self._eligible.clear()
        self._guarded.clear()
        self._until.clear()
        self._cached.clear()
