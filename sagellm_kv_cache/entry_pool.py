"""``EntryPool``: the mechanism of a standalone ``PrefixCache``.

A growable ``BlockPool`` whose blocks are cache entries that are never held:
every cached block is evictable, the pool starts empty and adds blocks (ids
``0, 1, 2...``) while it is under its cap, and the cache keeps a list from
block id to the object inserted for it. Lookups and inserts are the two
calls below; the eviction policy, the hash map, victims, invalidation
(``uncache``) and ``evict`` are the block pool's own::

    lookup(hashes)  --hit_prefix-->  leading cached run, refreshed in place
    insert(hashes)  --put_chain--->  cached run kept, new hashes get blocks
                                     (free, new, then victims), the whole
                                     chain evictable again, tail first
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from .block_pool import BlockPool
from .errors import KVNoVictimError, KVPoolFullError
from .eviction import EvictionPolicy
from .hashing import check_block_hashes

__all__ = ["EntryPool"]


class EntryPool(BlockPool):
    """A growable block pool of never-held entries (a standalone prefix cache's index).

    Args:
        max_entries: the cap (``None``: unbounded; the policy's capacity).
        block_size: tokens per block (bookkeeping only).
        policy: eviction policy name, enum, class or instance (default ``"lru"``).
        clock: monotonic seconds for the policy.
    """

    def __init__(
        self,
        max_entries: int | None,
        block_size: int = 16,
        policy: str | EvictionPolicy = "lru",
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            0, block_size, policy, clock=clock, growable=True, max_num_blocks=max_entries
        )

    def hit_prefix(self, block_hashes: Sequence[Hashable], *, refresh: bool = True) -> list[int]:
        """``match_prefix`` for a pool whose cached blocks are all evictable (no block is
        ever held): the run found is a hit without being taken. With ``refresh`` its
        blocks move in the order as a take and a tail-first release would; policies
        that track hits count one per block."""
        out = self.match_prefix(block_hashes)
        if out:
            policy = self.policy
            if refresh:
                policy.touch_many(out)
            if self._policy_tracks_hits:
                on_hit = policy.on_hit
                for b in out:
                    on_hit(b)
        return out

    def put_chain(self, block_hashes: Sequence[Hashable]) -> tuple[list[int], list[int]]:
        """The insert of a pool whose cached blocks are all evictable (a standalone cache):
        cache a chain of hashes and leave all its blocks evictable, released tail-first.

        A cached hash keeps its block (a hash repeated in the chain too); the others
        get blocks as ``allocate`` gives them (free, new ones in a growable pool, then
        victims), each registered under the previous position's block as parent. The
        chain's cached blocks leave the order while room is made: it never evicts itself.

        Returns:
            ``(block_ids, new_positions)``: each position's block; the positions whose
            block was newly registered.

        Raises:
            KVInvalidTypeError / KVInvalidInputError: a bad hash. KVPoolFullError /
                KVNoVictimError: no room, or the policy refuses the victims needed now.
                Nothing is changed then.
        """
        hashes = check_block_hashes(block_hashes)
        cached = self.cached
        ids: list = list(map(cached.get, hashes))
        policy = self.policy
        n = len(ids)
        k = ids.index(None) if None in ids else n
        n_new = n - k
        # the usual chain: distinct hashes, a cached run, then new ones
        usual = ids.count(None) == n_new and len(set(hashes)) == n
        if usual:
            existing = ids[:k]
        else:
            existing = list(dict.fromkeys(ids))
            if None in existing:
                existing.remove(None)
            n_new = len(set(hashes)) - len(existing)
        free_q = self.free_queue
        # a policy that refreshes in place (LRU) refreshes the cached run after the new
        # blocks go in when no victim is needed (touch_many is remove_many, then add_many
        # reversed); otherwise the run leaves the order while room is made
        in_place = usual and self._policy_touches and n_new <= len(free_q) + self.growth_room
        if existing and not in_place:
            policy.remove_many(existing)
        new_pos: list[int] = []
        fresh: list[int] = []
        if n_new:
            if n_new <= len(free_q):
                fresh = [free_q.popleft() for _ in range(n_new)]
            else:
                try:
                    fresh = self._take_short(n_new)
                except (KVNoVictimError, KVPoolFullError):
                    if existing and not in_place:  # back into the order, refreshed as a hit
                        policy.add_many(reversed(existing))
                    raise
            if usual:
                new_pos = list(range(k, n))
                new_hashes = hashes[k:]
                parent_ids = [ids[k - 1] if k else -1, *fresh[:-1]]
                ids[k:] = fresh
            else:  # new hashes interleaved with cached or repeated ones
                it = iter(fresh)
                for i in range(k, n):
                    if ids[i] is None:
                        b = cached.get(hashes[i])  # a hash repeated inside this chain
                        if b is None:
                            b = next(it)
                            new_pos.append(i)
                            cached[hashes[i]] = b  # provisional, for the repeats after it
                        ids[i] = b
                new_hashes = [hashes[i] for i in new_pos]
                parent_ids = [ids[i - 1] if i else -1 for i in new_pos]
            block_hashes_, parents = self.block_hashes, self.parent_ids
            for b, h, p in zip(fresh, new_hashes, parent_ids):
                block_hashes_[b] = h
                parents[b] = p
            cached.update(zip(new_hashes, fresh))
            if self._policy_on_cached:
                on_cached = policy.on_cached
                for b, h, p in zip(fresh, new_hashes, parent_ids):
                    on_cached(b, h, p)
            self.num_cached_total += n_new
        if in_place:
            policy.add_many(reversed(fresh))
            if k:
                policy.touch_many(existing)
        elif ids:
            policy.add_many(dict.fromkeys(reversed(ids)))
        return ids, new_pos
