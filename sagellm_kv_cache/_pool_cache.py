"""The prefix-cache side of ``KVPool``: block hashes, registering written blocks under
them, peeking at the cached run, evicting and invalidating.

``alloc_with_prefix`` (``pool.py``) takes the hit blocks; this part decides
what is a hit: ``cache_blocks`` / ``register_blocks`` put a handle's written
blocks under their hashes (immutable from then on), ``match_prefix`` peeks,
``invalidate`` and ``evict`` drop hashes.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from ._pool_base import PoolBase
from .checks import check_count, check_num_tokens
from .errors import KVInvalidInputError
from .handle import HandleState, KVHandle
from .hashing import check_block_hashes, compute_block_hashes, root_hash

__all__ = ["PoolCacheMixin"]


class PoolCacheMixin(PoolBase):
    """Hashes, ``cache_blocks`` / ``register_blocks``, ``match_prefix``, ``evict``, ``invalidate``."""

    def compute_block_hashes(self, tokens: Any, extra_keys: Any = None) -> list[bytes]:
        """This pool's chained hashes of the full blocks of ``tokens``."""
        root = self._root if extra_keys is None else root_hash(extra_keys, self._hash_fn)
        return compute_block_hashes(
            tokens, self.block_size, parent_hash=root, hash_fn=self._hash_fn
        )

    def _prompt_hashes(self, tokens, block_hashes, num_tokens, extra_keys) -> tuple[int, list]:
        if num_tokens is not None:
            num_tokens = check_num_tokens(num_tokens)
        if tokens is not None:
            if block_hashes is not None:
                raise KVInvalidInputError("give tokens or block_hashes, not both")
            hashes = self.compute_block_hashes(tokens, extra_keys)  # validates the tokens
            n = len(tokens)
            if num_tokens is not None and num_tokens != n:
                raise KVInvalidInputError(f"num_tokens={num_tokens} but {n} tokens given")
            check_num_tokens(n, "len(tokens)")
            return n, hashes
        if block_hashes is None or num_tokens is None:
            raise KVInvalidInputError(
                "alloc_with_prefix needs tokens, or block_hashes and num_tokens"
            )
        block_hashes = check_block_hashes(block_hashes)
        full = num_tokens // self.block_size
        if len(block_hashes) > -(-num_tokens // self.block_size) or len(block_hashes) < full:
            raise KVInvalidInputError(
                f"{len(block_hashes)} block hashes do not fit {num_tokens} tokens at block size "
                f"{self.block_size} (expected {full} or {-(-num_tokens // self.block_size)})"
            )
        return num_tokens, list(block_hashes[:full])

    def cache_blocks(
        self,
        handle: KVHandle,
        *,
        tokens: Any = None,
        block_hashes: Sequence[Hashable] | None = None,
        num_tokens: int | None = None,
    ) -> int:
        """Register ``handle``'s full blocks in the prefix cache (their KV is written).

        Hashes come from the handle (``alloc_with_prefix``) or are given here
        (``tokens`` or ``block_hashes``) for a handle from ``alloc``. With
        ``num_tokens`` only the first ``num_tokens // block_size`` blocks are
        cached (chunked prefill). Returns the number of newly cached blocks.

        Raises:
            KVInvalidTypeError / KVInvalidInputError: both ``tokens`` and
                ``block_hashes``, bad tokens, an unhashable or ``None`` hash,
                more hashes than full blocks, ``num_tokens`` not an int in
                ``[0, handle.num_tokens]``. Nothing is registered then.
        """
        if tokens is not None and block_hashes is not None:
            raise KVInvalidInputError("give tokens or block_hashes, not both")
        if num_tokens is not None:
            num_tokens = check_count(num_tokens, "num_tokens")
        given = None
        if tokens is not None:
            given = self.compute_block_hashes(tokens)
        elif block_hashes is not None:
            given = list(check_block_hashes(block_hashes))
        with self._lock:
            self._check_handle(handle)
            if num_tokens is not None and num_tokens > handle.num_tokens:
                raise KVInvalidInputError(
                    f"num_tokens={num_tokens} beyond the handle's {handle.num_tokens} tokens"
                )
            if given is not None:
                if len(given) > handle.num_tokens // self.block_size:
                    raise KVInvalidInputError(
                        f"{len(given)} block hashes for a handle of {handle.num_tokens} tokens "
                        f"({handle.num_tokens // self.block_size} full blocks)"
                    )
                handle.block_hashes = given
            hashes = handle.block_hashes
            if num_tokens is not None:
                hashes = hashes[: num_tokens // self.block_size]
            n = self._blocks.cache_blocks(
                handle.block_ids, hashes, handle.num_cached_tokens // self.block_size
            )
            if hashes:
                handle.state = HandleState.CACHED
            self._after()
            return n

    def register_blocks(
        self, handle: KVHandle, block_hashes: Sequence[Hashable], start_block: int = 0
    ) -> int:
        """Register blocks ``start_block .. len(block_hashes)-1`` of a live handle, already
        written, under ``block_hashes[i]``; returns how many were newly registered.

        The path for KV copied in from another tier or node (``KVOffloadManager``
        onboarding, a transfer receiver): call it only once the bytes are in the
        handle's blocks *and verified*; from then on they are prefix-cache hits.
        ``block_hashes[:start_block]`` name the blocks before (the parents).
        A hash already cached keeps its block; a block that already has a hash
        is skipped. The handle's ``num_cached_tokens`` is left to the caller.

        Raises:
            KVInvalidTypeError / KVInvalidInputError: not a live handle of this
                pool, a bad hash list (unhashable, ``None``), ``start_block`` not
                an int in ``[0, len(block_hashes)]``, more hashes than the
                handle's full blocks, or hashes that contradict the handle's own.
                Everything is checked before anything is registered.
        """
        hashes = check_block_hashes(block_hashes)
        start = check_count(start_block, "start_block")
        if start > len(hashes):
            raise KVInvalidInputError(f"start_block={start} beyond {len(hashes)} block hashes")
        with self._lock:
            self._check_handle(handle)
            if len(hashes) > handle.num_tokens // self.block_size:
                raise KVInvalidInputError(
                    f"{len(hashes)} block hashes for a handle of {handle.num_tokens} tokens "
                    f"({handle.num_tokens // self.block_size} full blocks)"
                )
            own = handle.block_hashes
            if own and own[: len(hashes)] != hashes:
                raise KVInvalidInputError(
                    f"block_hashes differ from handle {handle.handle_id}'s own block hashes"
                )
            n = self._blocks.cache_blocks(handle.block_ids, hashes, start)
            if not own:
                handle.block_hashes = list(hashes)
            if len(hashes) > start:
                handle.state = HandleState.CACHED
            self._after()
            return n

    def match_prefix(
        self, tokens: Any = None, *, block_hashes: Sequence[Hashable] | None = None
    ) -> tuple[list[int], int]:
        """Peek: ids of the cached leading blocks and their token count. Takes no reference."""
        if tokens is not None:
            if block_hashes is not None:
                raise KVInvalidInputError("give tokens or block_hashes, not both")
            block_hashes = self.compute_block_hashes(tokens)
        elif block_hashes is None:
            raise KVInvalidInputError("match_prefix needs tokens or block_hashes")
        else:
            block_hashes = check_block_hashes(block_hashes)
        with self._lock:
            hit = self._blocks.match_prefix(block_hashes) if self.enable_prefix_caching else []
            return hit, len(hit) * self.block_size

    def evict(self, num_blocks: int) -> list[int]:
        """Evict up to ``num_blocks`` evictable blocks now, in policy order; their ids."""
        num_blocks = check_num_tokens(num_blocks, "num_blocks")
        with self._lock:
            out = self._blocks.evict(num_blocks)
            self._after()
            return out

    def invalidate(self, block_hashes: Sequence[Hashable]) -> int:
        """Drop these hashes from the cache (blocks in use stay allocated). Returns count dropped.

        The whole list is checked first (hashable, not ``None``): a bad entry
        drops nothing.
        """
        block_hashes = check_block_hashes(block_hashes)
        with self._lock:
            n = 0
            for h in block_hashes:
                b = self._blocks.cached.get(h)
                if b is not None:
                    n += self._blocks.uncache(b)
            self._after()
            return n
