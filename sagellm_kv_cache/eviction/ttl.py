"""Time-pinned prefixes (explicit prompt caching with a TTL), LRU otherwise.

Key: ``(0, release number)`` among the unprotected evictable blocks, smallest
first; a protected block is no victim until its protection ends.

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

Protected evictable blocks wait on the keyed base's timers (by expiry time),
out of the victim heap; expiry never scans, and the clock is not read while
no block is protected.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable

from ..errors import KVNoVictimError
from .keyed import Key, KeyedPolicy, check_cached_ids, check_seconds

__all__ = ["TTLPolicy"]


class TTLPolicy(KeyedPolicy):
    name = "ttl"
    description = "LRU, but blocks pinned with pin_for(ids, ttl_s) are never victims until expiry"
    _lane_k0 = 0  # unprotected releases come in key order

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self._until: dict[int, float] = {}  # cached block -> protection expiry
        self._cached: set[int] = set()

    # -- public API ----------------------------------------------------------
    def pin_for(self, block_ids: Iterable[int], ttl_s: float) -> None:
        """Protect cached blocks from eviction for ``ttl_s`` seconds from now.

        Raises:
            KVInvalidInputError: ``ttl_s`` not a positive finite number, or a
                block that is not cached (nothing is changed then).
        """
        ttl_s = check_seconds(ttl_s, "ttl_s")
        ids = check_cached_ids(block_ids, self._cached)
        until = self.clock() + ttl_s
        for b in ids:
            u = self._until.get(b)
            if u is None or u < until:
                self._until[b] = u = until
            r = self._rel.get(b)
            if r is not None:  # evictable: no victim until u
                self._dequeue(b)
                self._timers.push(b, u, r)

    def unprotect(self, block_ids: Iterable[int]) -> None:
        """End the protection of cached blocks now (no-op for unprotected ones)."""
        ids = check_cached_ids(block_ids, self._cached)
        for b in ids:
            if self._until.pop(b, None) is not None and self._timers.discard(b):
                self._refile(b)

    def protected_until(self, block_id: int) -> float | None:
        """Expiry time of ``block_id``'s protection, None when it is not protected now."""
        u = self._until.get(block_id)
        return u if u is not None and u > self.clock() else None

    def num_eligible(self) -> int:
        """Evictable blocks that may be victims now (unprotected or expired)."""
        self._run_timers()
        return self._num_eligible()

    def is_protected(self, block_id: int) -> bool:
        u = self._until.get(block_id)
        return u is not None and u > self.clock()

    def num_victims(self, limit: int, exclude: Collection[int] = ()) -> int:
        self._run_timers()  # what pop_victims does first: no visible change
        heap, lane = self._heap, self._lane
        n = len(heap) + len(lane)
        if exclude:
            n -= sum(1 for b in exclude if b in heap or b in lane)
        return limit if n >= limit else n

    # -- keyed policy ----------------------------------------------------------
    def _key(self, block_id: int, release: int) -> Key:
        return 0, release

    def _file(self, block_id: int, release: int) -> None:
        u = self._until.get(block_id)
        if u is not None:
            if u > self.clock():
                self._timers.push(block_id, u, release)
                return
            del self._until[block_id]
        self._enqueue(block_id, 0, release)

    def _on_timer(self, block_id: int) -> None:
        # protection over: back at the place its release gave it
        self._until.pop(block_id, None)
        self._refile(block_id)

    def _no_victim(self) -> KVNoVictimError:
        eligible = self._num_eligible()
        guarded = len(self._rel) - eligible
        if not guarded:
            return super()._no_victim()
        return KVNoVictimError(
            f"{self.name}: {guarded} evictable blocks are TTL-protected, "
            f"only {eligible} can be evicted now"
        )

    # -- lifecycle -----------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        self._cached.add(block_id)

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        self._cached.discard(block_id)
        self._until.pop(block_id, None)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._cached.discard(block_id)
        self._until.pop(block_id, None)

    def reset(self) -> None:
        super().reset()
        self._until.clear()
        self._cached.clear()
