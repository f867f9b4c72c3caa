"""What the parts of ``KVPool`` share: its state, declared once, and the handle check.

``KVPool`` (``pool.py``) is assembled from mixins, one idea each: admission
(``_pool_admission.py``), the prefix-cache side (``_pool_cache.py``), KV data
movement (``_pool_kv.py``), stats and retention (``_pool_info.py``). Each
derives from ``PoolBase``, which declares the attributes ``KVPool.__init__``
sets and holds the checks every part runs on a call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .block_pool import BlockPool
from .errors import KVDoubleFreeError, KVInvalidHandleError, KVInvalidTypeError
from .handle import HandleState, KVHandle
from .storage import KVStorage

__all__ = ["PoolBase"]


class PoolBase:
    """The state of a ``KVPool`` its mixins read (set by ``KVPool.__init__``)."""

    block_size: int
    num_blocks: int
    max_tokens: int
    device: str
    dtype: str
    layout: str
    metadata_only: bool
    enable_prefix_caching: bool
    pool_id: str
    storage: KVStorage | None
    clock: Callable[[], float]
    debug: bool
    _lock: threading.RLock
    _blocks: BlockPool
    _handles: dict[str, KVHandle]
    _hash_fn: Callable[[bytes], bytes]
    _root: bytes
    # counters (zeroed by ``_reset_counters``)
    _num_allocs: int
    _num_frees: int
    _prefix_requests: int
    _prefix_hit_requests: int
    _prefix_query_tokens: int
    _prefix_hit_tokens: int
    _prefix_query_blocks: int
    _prefix_hit_blocks: int

    def _reset_counters(self) -> None:
        self._num_allocs = self._num_frees = 0
        self._prefix_requests = self._prefix_hit_requests = 0
        self._prefix_query_tokens = self._prefix_hit_tokens = 0
        self._prefix_query_blocks = self._prefix_hit_blocks = 0

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _check_handle(self, handle: Any) -> KVHandle:
        """``handle`` if it is a live handle of this pool, else a typed error."""
        if not isinstance(handle, KVHandle):
            raise KVInvalidTypeError(f"expected a KVHandle, got {type(handle).__name__}")
        if handle.pool_id != self.pool_id:
            raise KVInvalidHandleError(f"handle {handle.handle_id} belongs to another pool")
        if handle.state is HandleState.FREED:
            raise KVDoubleFreeError(f"handle {handle.handle_id} was already freed")
        if self._handles.get(handle.handle_id) is not handle:
            raise KVInvalidHandleError(
                f"handle {handle.handle_id} is not live in this pool (reset?)"
            )
        return handle

    def _after(self) -> None:
        if self.debug:
            self._blocks.check_invariants()
