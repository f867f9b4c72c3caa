"""The seed's handle-level prefix methods of ``KVCacheManager`` (a mixin).

``register_prefix(tokens, handle)`` files a live handle under its token
prefix in a ``PrefixIndex`` and pins it in the pool, so its blocks are never
evicted while registered; ``query_prefix(tokens)`` finds the handle of the
longest registered prefix; ``get_reused_blocks(tokens)`` names that handle's
blocks covering the match; ``unregister_prefix(handle)`` unpins it.
``alloc`` is the seed's request-less allocation (``pool.alloc``). This is the
seed's explicit registry; the block-level, hash-chain prefix cache of
``allocate(request_id, tokens=...)`` works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import KVInvalidHandleError, KVInvalidTypeError
from ..handle import KVHandle
from .prefix_index import PrefixIndex, _tokens

if TYPE_CHECKING:  # pragma: no cover
    from ..pool import KVPool

__all__ = ["CacheManagerSeedMixin"]


class CacheManagerSeedMixin:
    """The seed's prefix registry and request-less ``alloc`` on ``KVCacheManager``."""

    pool: KVPool  # the manager's device pool (``KVCacheManager.pool``)

    def _prefix_state(self) -> dict[str, Any]:
        st = self.__dict__.get("_seed_prefix")
        if st is None:
            st = self.__dict__["_seed_prefix"] = {
                "index": PrefixIndex(),
                "pinned": {},  # handle_id -> (handle, number of prefixes)
                "queries": 0,
                "hits": 0,
                "reused_tokens": 0,
                "query_tokens": 0,
            }
        return st

    def alloc(
        self,
        num_tokens: int,
        dtype: Any = None,
        layout: Any = None,
        device: str = "cpu",
        metadata: dict | None = None,
    ) -> KVHandle:
        """Seed API: allocate a handle in the device pool, outside any request
        (``free`` it with ``manager.pool.free(handle)``)."""
        return self.pool.alloc(
            num_tokens,
            device=device,
            dtype=getattr(dtype, "value", dtype),
            layout=getattr(layout, "value", layout),
            metadata=metadata,
        )

    def register_prefix(self, prefix_tokens: Sequence[int], handle: KVHandle) -> None:
        """File ``handle`` under ``prefix_tokens`` and pin it (never evicted while registered)."""
        toks = _tokens(prefix_tokens)
        if not isinstance(handle, KVHandle):
            raise KVInvalidTypeError(f"handle must be a KVHandle, got {type(handle).__name__}")
        if len(toks) > handle.num_tokens:
            raise KVInvalidHandleError(
                f"prefix of {len(toks)} tokens is longer than handle {handle.handle_id} "
                f"({handle.num_tokens} tokens)"
            )
        st = self._prefix_state()
        prev = st["index"].get(toks)
        entry = st["pinned"].get(handle.handle_id)
        if prev is handle:
            return
        if entry is None:
            self.pool.pin(handle)  # validates it is a live handle of this pool first
        st["index"].insert(toks, handle)
        st["pinned"][handle.handle_id] = (handle, 1 if entry is None else entry[1] + 1)
        if prev is not None:
            self._drop_one(prev)

    def _drop_one(self, handle: KVHandle) -> None:
        st = self._prefix_state()
        h, n = st["pinned"][handle.handle_id]
        if n > 1:
            st["pinned"][handle.handle_id] = (h, n - 1)
        else:
            del st["pinned"][handle.handle_id]
            if not h.is_freed:
                self.pool.unpin(h)

    def unregister_prefix(self, handle: KVHandle) -> int:
        """Remove every prefix filed under ``handle`` and unpin it; returns how many."""
        st = self._prefix_state()
        entry = st["pinned"].pop(handle.handle_id, None)
        n = st["index"].remove_value(handle)
        if entry is not None and not entry[0].is_freed:
            self.pool.unpin(entry[0])
        return n

    def query_prefix(self, tokens: Sequence[int]) -> tuple[KVHandle | None, int]:
        """The handle of the longest registered prefix of ``tokens`` and its length."""
        toks = _tokens(tokens, "tokens")
        st = self._prefix_state()
        handle, n = st["index"].longest_prefix_match(toks)
        st["queries"] += 1
        st["query_tokens"] += len(toks)
        if handle is not None:
            st["hits"] += 1
            st["reused_tokens"] += n
        return handle, n

    def get_reused_blocks(self, tokens: Sequence[int]) -> tuple[list[int], int]:
        """Block ids of the matched handle that hold the matched prefix, and its tokens."""
        handle, n = self.query_prefix(tokens)
        if handle is None:
            return [], 0
        bs = handle.block_size
        return list(handle.block_ids[: (n + bs - 1) // bs]), n

    def get_prefix_metrics(self) -> dict[str, float | int]:
        st = self._prefix_state()
        q = st["queries"]
        return {
            "prefix_queries": q,
            "prefix_hits": st["hits"],
            "prefix_hit_rate": st["hits"] / q if q else 0.0,
            "reused_tokens": st["reused_tokens"],
            "token_reuse_ratio": st["reused_tokens"] / st["query_tokens"]
            if st["query_tokens"]
            else 0.0,
            "registered_prefixes": len(st["index"]),
            "pinned_handles": len(st["pinned"]),
        }
