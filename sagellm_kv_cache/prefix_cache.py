"""``PrefixCache`` (seed API): block-hash prefix reuse across requests.

Two modes over the same semantics and the same mechanism, a ``BlockPool``:

* **standalone** (``PrefixCache(block_size=16, max_cached_blocks=100)``): an
  index from block hash to whatever block object the caller inserted
  (``{"block_id": 3}``, an int, a handle...). The index is an ``EntryPool``
  (``entry_pool.py``: a growable ``BlockPool``, one block per entry, never
  held, so every entry is evictable) beside a list from its block ids to the
  inserted objects.
  Capacity is counted in entries; when full, the eviction policy (LRU by
  default) picks what goes.
* **pool-bound** (``PrefixCache(pool=kv_pool)``): the index *is* the pool's
  hash map, blocks are the pool's integer block ids, capacity is the pool's,
  eviction is the pool's policy. The cache and the pool agree on block ids
  because there is only one map.

A lookup walks the hashes in order and stops at the first miss: chained
hashes make a later hit without an earlier one meaningless.

Hit ratios (``get_stats()``), all over ``lookup`` calls:

* ``token_hit_ratio`` = hit tokens / queried tokens (queried tokens =
  ``num_tokens`` passed to ``lookup``, default ``len(hashes) * block_size``);
  the seed's ``hit_rate`` is the same figure;
* ``block_hit_ratio`` = hit blocks / queried blocks;
* ``request_hit_ratio`` = lookups with at least one hit / lookups.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from .block_pool import BlockPool
from .checks import check_count
from .entry_pool import EntryPool
from .errors import (
    KVCacheMissError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVPrefixTooLongError,
)
from .eviction import EvictionPolicy
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
        self._lock = threading.RLock() if pool is None else pool.lock
        if pool is None:
            self._entries = EntryPool(max_cached_blocks, block_size, eviction_policy)
            self._blocks: BlockPool = self._entries
            self._objects: list[Any] = []  # block id -> the object inserted for it
            self._handle_of: list[Any] = []  # block id -> its handle_id (or None)
            self._by_handle: dict[Any, set[int]] = {}
        else:
            self._blocks = pool.block_pool
        self._reset_stats()

    @property
    def block_pool(self) -> BlockPool:
        """The mechanism underneath (read-only use: tests, inspection): its own growable
        pool standalone, the ``KVPool``'s pool-bound."""
        return self._blocks

    def _reset_stats(self) -> None:
        self._lookups = self._hit_lookups = 0
        self._query_tokens = self._hit_tokens = 0
        self._query_blocks = self._hit_blocks = 0
        self._insertions = self._evictions = self._invalidations = 0

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
    def lookup(
        self, hashes: Sequence[Hashable], num_tokens: int | None = None
    ) -> tuple[list[Any], int]:
        """Longest cached prefix of ``hashes``.

        Args:
            hashes: the request's block hashes, in order.
            num_tokens: prompt length for the token hit ratio (default: ``len(hashes) * block_size``).

        Returns:
            ``(hit_blocks, num_hit_tokens)``: the inserted block objects (block
            ids when pool-bound) of the leading hit run, and its token count.
        """
        hashes = check_block_hashes(hashes, "hashes")
        bs = self.block_size
        q_tokens = len(hashes) * bs if num_tokens is None else check_count(num_tokens, "num_tokens")
        with self._lock:
            if self.pool is not None:
                hit_blocks = self._blocks.match_prefix(hashes)
            else:
                objects = self._objects
                ids = self._entries.hit_prefix(hashes, refresh=self.enable_lru)
                hit_blocks = [objects[b] for b in ids]
            n = len(hit_blocks)
            self._lookups += 1
            self._query_tokens += q_tokens
            self._query_blocks += len(hashes)
            if n:
                self._hit_lookups += 1
                self._hit_tokens += n * bs
                self._hit_blocks += n
            return hit_blocks, n * bs

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
        hashes = check_block_hashes(hashes, "hashes")
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
        bp = self._blocks
        ids: list[int] = []
        for blk in blocks:
            b = blk.get("block_id") if isinstance(blk, dict) else blk
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < bp.num_blocks:
                raise KVInvalidInputError(f"block id {b!r} is not a block of this pool")
            ids.append(b)
            if not bp.ref_counts[b] and not bp.pin_counts[b]:
                raise KVInvalidInputError(
                    f"block {b} is not held by a live handle; only written blocks can be cached"
                )
        n = bp.cache_blocks(ids, hashes)
        self._insertions += n
        return n

    def _insert_standalone(self, hashes: list, blocks: Sequence[Any], handle_id: Any) -> int:
        bp = self._entries
        evictions = bp.num_evictions
        ids, new_pos = bp.put_chain(hashes)
        self._evictions += bp.num_evictions - evictions
        objects, handle_of = self._objects, self._handle_of
        grown = bp.num_blocks - len(objects)
        if grown > 0:
            objects += [None] * grown
            handle_of += [None] * grown
        grouped = handle_id is not None or bool(self._by_handle)
        for i in new_pos:
            blk = blocks[i]
            objects[ids[i]] = blk
            if type(blk) is dict and "handle_id" in blk:
                grouped = True
        if grouped:
            by_handle = self._by_handle
            for i in new_pos:
                b = ids[i]
                if handle_of[b] is not None:  # a victim of this insert: its group lets go
                    self._ungroup(b)
                blk = blocks[i]
                hid = blk.get("handle_id", handle_id) if type(blk) is dict else handle_id
                if hid is not None:
                    handle_of[b] = hid
                    by_handle.setdefault(hid, set()).add(b)
        self._insertions += len(new_pos)
        return len(new_pos)

    def _ungroup(self, b: int) -> None:
        """Take block ``b`` out of its handle's group (standalone)."""
        hid = self._handle_of[b]
        self._handle_of[b] = None
        group = self._by_handle.get(hid)
        if group is not None:
            group.discard(b)
            if not group:
                del self._by_handle[hid]

    def _forget(self, block_ids: list[int]) -> None:
        """Drop the objects of blocks that left the standalone index."""
        objects, handle_of = self._objects, self._handle_of
        for b in block_ids:
            objects[b] = None
            if handle_of[b] is not None:
                self._ungroup(b)

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
                objects, handle_of, bp = self._objects, self._handle_of, self._blocks
                for b in slots:
                    objects[b] = handle_of[b] = None
                    bp.uncache(b, reason="invalidate")
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
            bp = self._blocks
            if self.pool is not None:
                n = len(bp.evict(num_blocks)) if num_blocks else 0
            else:
                # one at a time: a policy that learns from evictions (workload_aware)
                # sees each one before it picks the next
                n = 0
                for _ in range(min(num_blocks, len(bp.policy))):
                    out = bp.evict(1)
                    if not out:  # a constrained policy ran out of eligible victims
                        break
                    self._forget(out)
                    n += 1
            self._evictions += n
            return n

    def clear(self) -> None:
        """Drop every entry (pool-bound: every evictable block's hash; blocks in use keep theirs)."""
        with self._lock:
            bp = self._blocks
            if self.pool is not None:
                bp.evict(len(bp.policy), reason="clear")
                if len(bp.policy):  # entries the policy protects (TTL) go too
                    ref, pins = bp.ref_counts, bp.pin_counts
                    for b in [b for b in bp.cached.values() if not ref[b] and not pins[b]]:
                        bp.uncache(b, reason="clear")
            else:
                bp.reset()
                self._objects.clear()
                self._handle_of.clear()
                self._by_handle.clear()

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_stats()

    def __len__(self) -> int:
        return self._blocks.num_cached

    def __contains__(self, block_hash: object) -> bool:
        try:
            hash(block_hash)
        except TypeError:
            raise KVInvalidTypeError(
                f"a block hash is hashable, got {type(block_hash).__name__}"
            ) from None
        return block_hash in self._blocks.cached

    def entries(self) -> dict[Hashable, tuple[Any, Any]]:
        """The cached entries, ``hash -> (block, handle_id)``: standalone the object
        inserted and the handle it is grouped under (or ``None``), pool-bound the
        pool's block id and ``None``. A new dict, in no particular order."""
        with self._lock:
            cached = self._blocks.cached
            if self.pool is not None:
                return {h: (b, None) for h, b in cached.items()}
            objects, handle_of = self._objects, self._handle_of
            return {h: (objects[b], handle_of[b]) for h, b in cached.items()}

    def get_stats(self) -> dict[str, Any]:
        """Counters and ratios; see the module docstring for the ratio definitions."""
        with self._lock:
            q_tok, q_blk, lk = self._query_tokens, self._query_blocks, self._lookups
            token_ratio = self._hit_tokens / q_tok if q_tok else 0.0
            return {
                "hit_rate": token_ratio,  # the seed's name
                "token_hit_ratio": token_ratio,
                "block_hit_ratio": self._hit_blocks / q_blk if q_blk else 0.0,
                "request_hit_ratio": self._hit_lookups / lk if lk else 0.0,
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
