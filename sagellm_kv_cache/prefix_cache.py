"""``PrefixCache`` (seed API): block-hash prefix reuse across requests.

Two modes over the same semantics:

* **standalone** (``PrefixCache(block_size=16, max_cached_blocks=100)``): an
  index from block hash to whatever block object the caller inserted
  (``{"block_id": 3}``, an int, a handle...). Capacity is counted in entries;
  when full, the eviction policy (LRU by default) picks what goes.
* **pool-bound** (``PrefixCache(pool=kv_pool)`` or ``kv_pool.prefix_cache``):
  the index *is* the pool's hash map, blocks are the pool's integer block ids,
  capacity is the pool's, eviction is the pool's policy. The cache and the
  pool agree on block ids because there is only one map.

A lookup walks the hashes in order and stops at the first miss: chained
hashes make a later hit without an earlier one meaningless.

Hit rates (``get_stats()``), all over ``lookup`` calls:

* ``hit_rate`` = ``token_hit_rate`` = hit tokens / queried tokens
  (queried tokens = ``num_tokens`` passed to ``lookup``, default
  ``len(hashes) * block_size``);
* ``block_hit_rate`` = hit blocks / queried blocks;
* ``request_hit_rate`` = lookups with at least one hit / lookups.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from .block_pool import check_count
from .errors import (
    KVCacheMissError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVNoVictimError,
    KVPrefixTooLongError,
)
from .eviction import EvictionPolicy, make_policy
from .eviction.lru import LRUPolicy
from .hashing import (
    check_block_hashes,
    compute_block_hash,
    compute_block_hashes,
    get_hash_fn,
    pack_tokens,
    root_hash,
)

if TYPE_CHECKING:  # pragma: no cover
    from .pool import KVPool

__all__ = ["PrefixCache"]


class PrefixCache:
    """Chained-hash prefix cache.

    Args:
        block_size: tokens per block.
        max_cached_blocks: entry capacity (standalone; ``None`` = unbounded).
        enable_lru: refresh an entry's recency on a hit (False: insertion order).
        eviction_policy: policy name/instance (standalone; default ``"lru"``).
        hash_fn: ``"sha256"`` (default), ``"blake2b"`` or ``"xxh3_128"``.
        extra_keys: salt / namespace mixed into the first block's hash.
        pool: bind to a ``KVPool`` (its block size, hash map and policy).
    """

    def __init__(
        self,
        block_size: int = 16,
        max_cached_blocks: int | None = None,
        enable_lru: bool = True,
        *,
        eviction_policy: str | EvictionPolicy = "lru",
        hash_fn: str | Callable[[bytes], bytes] = "sha256",
        extra_keys: Any = None,
        pool: KVPool | None = None,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise KVInvalidInputError(f"block_size must be a positive int, got {block_size!r}")
        if max_cached_blocks is not None and (
            isinstance(max_cached_blocks, bool)
            or not isinstance(max_cached_blocks, int)
            or max_cached_blocks <= 0
        ):
            raise KVInvalidInputError(
                f"max_cached_blocks must be a positive int or None, got {max_cached_blocks!r}"
            )
        self.pool = pool
        if pool is not None:
            block_size = pool.block_size
            hash_fn = pool.hash_fn_name
            max_cached_blocks = pool.num_blocks
            extra_keys = pool.extra_keys if extra_keys is None else extra_keys
        self.block_size = block_size
        self.max_cached_blocks = max_cached_blocks
        self.enable_lru = enable_lru
        self._hash_fn = get_hash_fn(hash_fn)
        self._root = root_hash(extra_keys, self._hash_fn)
        self._lock = threading.RLock() if pool is None else pool._lock
        if pool is None:
            self._policy = make_policy(eviction_policy)
            self._policy.set_capacity(max_cached_blocks)
            # plain LRU (not a subclass with its own hooks) takes the fast insert path
            self._lru_fast = type(self._policy) is LRUPolicy
            self._tracks_hits = self._policy.tracks_hits
            self._policy_on_cached = type(self._policy).on_cached is not EvictionPolicy.on_cached
            self._index: dict[Hashable, int] = {}  # hash -> slot
            self._slot_hash: list[Hashable | None] = []
            self._slot_block: list[Any] = []
            self._slot_handle: list[Any] = []
            self._free_slots: list[int] = []
            self._by_handle: dict[Any, set[int]] = {}
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._lookups = 0
        self._hit_lookups = 0
        self._query_tokens = 0
        self._hit_tokens = 0
        self._query_blocks = 0
        self._hit_blocks = 0
        self._insertions = 0
        self._evictions = 0
        self._invalidations = 0

    # -- hashing -------------------------------------------------------------
    def compute_block_hashes(self, tokens: Any, extra_keys: Any = None) -> list[bytes]:
        """Chained hashes of the full blocks of ``tokens`` (a trailing partial block is ignored)."""
        root = self._root if extra_keys is None else root_hash(extra_keys, self._hash_fn)
        return compute_block_hashes(
            tokens, self.block_size, parent_hash=root, hash_fn=self._hash_fn
        )

    def compute_block_hash(
        self, block_tokens: Sequence[int], parent_hash: bytes | None = None
    ) -> bytes:
        """Hash of one full block chained to ``parent_hash`` (None: first block)."""
        n = len(pack_tokens(block_tokens)) // 8  # validates the tokens first
        if n != self.block_size:
            raise KVInvalidInputError(f"a block has {self.block_size} tokens, got {n}")
        return compute_block_hash(
            parent_hash if parent_hash is not None else self._root, block_tokens, self._hash_fn
        )

    # -- lookup / insert -----------------------------------------------------
    @staticmethod
    def _check_hashes(hashes: Any) -> list:
        return check_block_hashes(hashes, "hashes")  # hashable, not None; a list

    def lookup(
        self, hashes: Sequence[Hashable], num_tokens: int | None = None
    ) -> tuple[list[Any], int]:
        """Longest cached prefix of ``hashes``.

        Args:
            hashes: the request's block hashes, in order.
            num_tokens: prompt length for the token hit rate (default: ``len(hashes) * block_size``).

        Returns:
            ``(hit_blocks, num_hit_tokens)``: the inserted block objects (block
            ids when pool-bound) of the leading hit run, and its token count.
        """
        hashes = self._check_hashes(hashes)
        bs = self.block_size
        q_tokens = len(hashes) * bs if num_tokens is None else check_count(num_tokens, "num_tokens")
        with self._lock:
            if self.pool is not None:
                hit_blocks = self.pool.block_pool.match_prefix(hashes)
            else:
                slots: list[int] = list(map(self._index.get, hashes))
                if None in slots:
                    del slots[slots.index(None) :]
                if slots:
                    self._touch(slots)
                blocks = self._slot_block
                hit_blocks = [blocks[s] for s in slots]
            n = len(hit_blocks)
            self._lookups += 1
            self._query_tokens += q_tokens
            self._query_blocks += len(hashes)
            if n:
                self._hit_lookups += 1
                self._hit_tokens += n * bs
                self._hit_blocks += n
            return hit_blocks, n * bs

    def _touch(self, slots: list[int]) -> None:
        policy = self._policy
        if self.enable_lru:
            # refresh recency the way a release does: tail first, prefix most recent
            policy.touch_many(slots)
        if self._tracks_hits:
            for s in slots:
                policy.on_hit(s)

    def insert(
        self, hashes: Sequence[Hashable], blocks: Sequence[Any], handle_id: Any = None
    ) -> int:
        """Register ``blocks[i]`` under ``hashes[i]``; returns the number of new entries.

        A hash already cached keeps its block (one block per hash) and is
        refreshed. Standalone, ``handle_id`` (or a ``"handle_id"`` key in a
        dict block) groups entries for ``invalidate``. Pool-bound, ``blocks``
        are block ids (or dicts with ``"block_id"``) of blocks in use.

        Raises:
            KVInvalidInputError: ``len(hashes) != len(blocks)``; a pool block not in use.
            KVPrefixTooLongError: more blocks than the cache can hold.
        """
        hashes = self._check_hashes(hashes)
        if isinstance(blocks, str | bytes) or not isinstance(blocks, Sequence):
            raise KVInvalidTypeError(f"blocks must be a list, got {type(blocks).__name__}")
        if len(hashes) != len(blocks):
            raise KVInvalidInputError(f"insert: {len(hashes)} hashes but {len(blocks)} blocks")
        if handle_id is not None:
            try:
                hash(handle_id)
            except TypeError:
                raise KVInvalidTypeError(
                    f"handle_id must be hashable, got {type(handle_id).__name__}"
                ) from None
        if self.max_cached_blocks is not None and len(hashes) > self.max_cached_blocks:
            raise KVPrefixTooLongError(
                f"prefix of {len(hashes)} blocks cannot fit a cache of {self.max_cached_blocks} blocks"
            )
        if not hashes:
            return 0
        with self._lock:
            if self.pool is not None:
                return self._insert_pool(hashes, blocks)
            return self._insert_standalone(hashes, blocks, handle_id)

    def _insert_pool(self, hashes: list, blocks: Sequence[Any]) -> int:
        pool = self.pool
        bp = pool.block_pool
        ids = [b.get("block_id") if isinstance(b, dict) else b for b in blocks]
        for b in ids:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < bp.num_blocks:
                raise KVInvalidInputError(f"block id {b!r} is not a block of this pool")
            if not bp.ref_counts[b] and not bp.pin_counts[b]:
                raise KVInvalidInputError(
                    f"block {b} is not held by a live handle; only written blocks can be cached"
                )
        n = bp.cache_blocks(ids, hashes)
        self._insertions += n
        return n

    def _insert_standalone(self, hashes: list, blocks: Sequence[Any], handle_id: Any) -> int:
        if self._lru_fast:
            n = self._insert_lru_suffix(hashes, blocks, handle_id)
            if n >= 0:
                return n
        index = self._index
        index_get = index.get
        policy = self._policy
        # take this prefix's existing entries out of the evictable order so that
        # making room never evicts part of the prefix being inserted
        slots: list[int | None] = [index_get(h) for h in hashes]
        existing = dict.fromkeys(s for s in slots if s is not None)
        if existing:
            policy.remove_many(existing)
        n_new = len(slots) - len(existing) if None in slots else 0
        victims: list[int] = []
        if n_new and self.max_cached_blocks is not None:
            # take every victim before changing anything: a policy that cannot
            # supply them (TTL-protected entries) raises with the cache intact
            distinct_new = len({hashes[i] for i, s in enumerate(slots) if s is None})
            k = len(index) + distinct_new - self.max_cached_blocks
            if k > 0:
                try:
                    victims = policy.pop_victims(k)
                except KVNoVictimError:
                    if existing:  # back into the order, refreshed as a hit would
                        policy.add_many(reversed(existing))
                    raise
                victims.reverse()  # popped from the end below, in policy order
        if n_new:
            slot_hash, slot_block, slot_handle = (
                self._slot_hash,
                self._slot_block,
                self._slot_handle,
            )
            free_slots = self._free_slots
            capacity = self.max_cached_blocks
            on_cached = policy.on_cached if self._policy_on_cached else None
            n_new = 0
            for i, s in enumerate(slots):
                if s is not None:
                    continue
                h = hashes[i]
                s = index_get(h)  # a hash repeated inside this insert
                if s is None:
                    if free_slots:
                        s = free_slots.pop()
                    elif capacity is not None and len(index) >= capacity:
                        self._drop(victims.pop(), evicted=True)
                        self._evictions += 1
                        s = free_slots.pop()
                    else:
                        s = len(slot_hash)
                        slot_hash.append(None)
                        slot_block.append(None)
                        slot_handle.append(None)
                    blk = blocks[i]
                    hid = blk.get("handle_id", handle_id) if type(blk) is dict else handle_id
                    index[h] = s
                    slot_hash[s] = h
                    slot_block[s] = blk
                    if hid is not None:
                        slot_handle[s] = hid
                        self._by_handle.setdefault(hid, set()).add(s)
                    if on_cached is not None:
                        on_cached(s, h, slots[i - 1] if i else -1)
                    n_new += 1
                slots[i] = s
        policy.add_many(dict.fromkeys(reversed(slots)))  # tail first: the prefix is most recent
        self._insertions += n_new
        return n_new

    def _insert_lru_suffix(self, hashes: list, blocks: Sequence[Any], handle_id: Any) -> int:
        """The common insert under plain LRU: a cached prefix then only new, distinct
        hashes. Same result as the general path in fewer steps; -1 when it does not apply."""
        index = self._index
        slots = list(map(index.get, hashes))
        n = len(slots)
        k = slots.index(None) if None in slots else n
        new_hashes = hashes[k:]
        if slots.count(None) != n - k or len(set(new_hashes)) != n - k:
            return -1  # interleaved or repeated hashes: the general path
        policy = self._policy
        existing = slots[:k]
        capacity = self.max_cached_blocks
        free_slots = self._free_slots
        n_new = n - k
        evict = 0 if capacity is None else len(index) + n_new - capacity
        if evict > 0:
            # the prefix must survive: take it out of the order before choosing victims
            if existing:
                policy.remove_many(existing)
            try:
                victims = policy.pop_victims(evict)
            except KVNoVictimError:
                if existing:
                    policy.add_many(reversed(existing))
                raise
            for v in victims:
                self._drop(v, evicted=True)
            self._evictions += evict
        slot_hash, slot_block, slot_handle = self._slot_hash, self._slot_block, self._slot_handle
        # slots: free ones in pop order (last freed first), then fresh ones at the end
        n_free = len(free_slots)
        if n_free >= n_new:
            new_slots = free_slots[n_free - n_new :][::-1]
            del free_slots[n_free - n_new :]
        else:
            new_slots = free_slots[::-1]
            free_slots.clear()
            base = len(slot_hash)
            grow = n_new - n_free
            new_slots += range(base, base + grow)
            slot_hash.extend([None] * grow)
            slot_block.extend([None] * grow)
            slot_handle.extend([None] * grow)
        new_blocks = blocks[k:]
        for s, h, blk in zip(new_slots, new_hashes, new_blocks):
            slot_hash[s] = h
            slot_block[s] = blk
        if handle_id is not None or any(type(b) is dict and "handle_id" in b for b in new_blocks):
            by_handle = self._by_handle
            for s, blk in zip(new_slots, new_blocks):
                hid = blk.get("handle_id", handle_id) if type(blk) is dict else handle_id
                if hid is not None:
                    slot_handle[s] = hid
                    by_handle.setdefault(hid, set()).add(s)
        index.update(zip(new_hashes, new_slots))
        # final order, as the general path: new blocks tail first, then the prefix
        policy.add_many(reversed(new_slots))
        if existing:
            if evict > 0:  # taken out above
                policy.add_many(reversed(existing))
            else:
                policy.touch_many(existing)
        self._insertions += n_new
        return n_new

    def _drop(self, s: int, *, evicted: bool) -> None:
        h = self._slot_hash[s]
        del self._index[h]
        hid = self._slot_handle[s]
        if hid is not None:
            group = self._by_handle.get(hid)
            if group is not None:
                group.discard(s)
                if not group:
                    del self._by_handle[hid]
        self._slot_hash[s] = self._slot_block[s] = self._slot_handle[s] = None
        if evicted:
            self._policy.on_evicted(s, h)
        else:
            self._policy.on_removed(s, h)
        self._free_slots.append(s)

    # -- removal -------------------------------------------------------------
    def invalidate(self, handle_id: Any) -> int:
        """Drop every entry inserted for ``handle_id``; returns how many.

        Raises:
            KVCacheMissError: nothing is cached for that handle.
        """
        with self._lock:
            if self.pool is not None:
                handle = self.pool.get_handle(getattr(handle_id, "handle_id", handle_id))
                n = self.pool.invalidate([h for h in handle.block_hashes if h is not None])
            else:
                try:
                    slots = self._by_handle.pop(handle_id, None)
                except TypeError:
                    raise KVInvalidTypeError(
                        f"handle_id must be hashable, got {type(handle_id).__name__}"
                    ) from None
                if not slots:
                    raise KVCacheMissError(f"no cached blocks for handle {handle_id!r}")
                for s in slots:
                    self._slot_handle[s] = None
                    self._policy.remove(s)
                    self._drop(s, evicted=False)
                n = len(slots)
            self._invalidations += n
            return n

    def evict_by_count(self, num_blocks: int) -> int:
        """Evict up to ``num_blocks`` entries in policy order; returns how many went."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
            raise KVInvalidTypeError(f"num_blocks must be an int, got {type(num_blocks).__name__}")
        if num_blocks < 0:
            raise KVInvalidInputError(f"num_blocks must be >= 0, got {num_blocks}")
        with self._lock:
            if self.pool is not None:
                n = len(self.pool.block_pool.evict(num_blocks)) if num_blocks else 0
            else:
                n = 0
                for _ in range(min(num_blocks, len(self._policy))):
                    try:  # a constrained policy may run out of eligible victims early
                        victim = self._policy.pop_victim()
                    except KVNoVictimError:
                        break
                    self._drop(victim, evicted=True)
                    n += 1
            self._evictions += n
            return n

    def clear(self) -> None:
        """Drop every entry (pool-bound: every evictable block's hash; blocks in use keep theirs)."""
        with self._lock:
            if self.pool is not None:
                bp = self.pool.block_pool
                bp.evict(len(bp.policy), reason="clear")
                if len(bp.policy):  # entries the policy protects (TTL) go too
                    ref, pins = bp.ref_counts, bp.pin_counts
                    for b in [b for b in bp.cached.values() if not ref[b] and not pins[b]]:
                        bp.uncache(b, reason="clear")
            else:
                self._index.clear()
                self._slot_hash.clear()
                self._slot_block.clear()
                self._slot_handle.clear()
                self._free_slots.clear()
                self._by_handle.clear()
                self._policy.reset()

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_stats()

    def __len__(self) -> int:
        return self.pool.block_pool.num_cached if self.pool is not None else len(self._index)

    def __contains__(self, block_hash: object) -> bool:
        try:
            hash(block_hash)
        except TypeError:
            raise KVInvalidTypeError(
                f"a block hash is hashable, got {type(block_hash).__name__}"
            ) from None
        if self.pool is not None:
            return block_hash in self.pool.block_pool.cached
        return block_hash in self._index

    def get_stats(self) -> dict[str, Any]:
        """Counters and ratios; see the module docstring for the ratio definitions."""
        with self._lock:
            q_tok, q_blk, lk = self._query_tokens, self._query_blocks, self._lookups
            token_rate = self._hit_tokens / q_tok if q_tok else 0.0
            return {
                "hit_rate": token_rate,
                "token_hit_rate": token_rate,
                "block_hit_rate": self._hit_blocks / q_blk if q_blk else 0.0,
                "request_hit_rate": self._hit_lookups / lk if lk else 0.0,
                "lookups": lk,
                "hit_lookups": self._hit_lookups,
                "query_tokens": q_tok,
                "hit_tokens": self._hit_tokens,
                "query_blocks": q_blk,
                "hit_blocks": self._hit_blocks,
                "miss_blocks": q_blk - self._hit_blocks,
                "insertions": self._insertions,
                "evictions": self._evictions,
                "invalidations": self._invalidations,
                "num_cached_blocks": len(self),
                "max_cached_blocks": self.max_cached_blocks,
                "block_size": self.block_size,
            }

    def __repr__(self) -> str:
        mode = "pool-bound" if self.pool is not None else "standalone"
        return f"PrefixCache({mode}, blocks={len(self)}/{self.max_cached_blocks}, block_size={self.block_size})"
