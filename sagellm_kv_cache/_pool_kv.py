"""KV data movement of ``KVPool`` (``write_kv``, ``read_kv``, ``copy_blocks``).

Kept apart from the bookkeeping in ``pool.py``; mixed into ``KVPool``, whose
state (declared in ``_pool_base.PoolBase``) these methods use.

What may be written (a cached block is immutable, DESIGN.md)::

    handle.block_ids   [ b0 | b1 | b2 | b3 ]     b0, b1 cached (hits, or cached by this handle)
                         ^^^^^^^   ^^^^^^^
                         refused   writable: held by this handle only, no hash

* ``write_kv`` writes only into blocks of the handle that are not cached
  (no hash) and not shared with another live handle (ref count 1). A write
  whose token range touches any other block raises ``KVBlockImmutableError``
  (``details["block_ids"]`` lists them) and writes nothing. So: write the KV
  of ``tokens[num_hit_tokens:]`` after ``alloc_with_prefix``, then
  ``cache_blocks``; after that the handle's cached blocks are read-only.
* ``copy_blocks`` is a block-level staging primitive with no handle: its
  destinations must be FREE blocks (no reference, no pin, no hash), since a
  held block may be another request's KV in the making. Copy-on-write into a
  block a handle holds goes through ``read_kv`` / ``write_kv`` on handles.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ._pool_base import PoolBase
from .checks import check_count
from .errors import KVBlockImmutableError, KVConfigError, KVInvalidInputError
from .handle import KVHandle
from .storage import KVStorage

__all__ = ["PoolKVMixin"]


class PoolKVMixin(PoolBase):
    """``write_kv`` / ``read_kv`` / ``copy_blocks`` for ``KVPool``."""

    def _require_storage(self) -> KVStorage:
        if self.storage is None:
            raise KVConfigError(
                "this pool is metadata-only (no model_shape): it holds no KV tensors"
            )
        return self.storage

    def write_kv(self, handle: KVHandle, kv: Any, start_token: int = 0) -> None:
        """Write ``kv`` (``[num_layers, 2, T, num_kv_heads, head_dim]``) into the
        handle's token slots ``start_token .. start_token + T``.

        Raises:
            KVBlockImmutableError: the range touches a cached block or one shared
                with another handle (see the module docstring); nothing written.
            KVInvalidTypeError / KVInvalidInputError: not a tensor, a meta
                tensor, wrong shape or dtype, ``start_token`` not an int >= 0,
                a range beyond the handle.
        """
        storage = self._require_storage()
        start_token = check_count(start_token, "start_token")
        with self._lock:
            self._check_handle(handle)
            T = storage.check_kv(kv)  # type, device, shape, dtype
            if start_token + T > handle.num_tokens:
                raise KVInvalidInputError(
                    f"writing {T} tokens at token {start_token} does not fit a handle of "
                    f"{handle.num_tokens} tokens"
                )
            bs = self.block_size
            ids = handle.block_ids[start_token // bs : (start_token + T - 1) // bs + 1]
            bp = self._blocks
            hashes, ref = bp.block_hashes, bp.ref_counts
            if list(map(hashes.__getitem__, ids)).count(None) != len(ids) or (
                max(map(ref.__getitem__, ids)) > 1
            ):
                refused = [b for b in ids if hashes[b] is not None or ref[b] > 1]
                raise KVBlockImmutableError(
                    f"tokens [{start_token}, {start_token + T}) of handle {handle.handle_id} "
                    f"fall in cached or shared blocks {refused}; a cached block's KV never "
                    "changes (write only the tokens after the prefix hit, before cache_blocks)",
                    block_ids=refused,
                )
            storage.write_tokens(handle.block_ids, kv, start_token)
            handle.last_access_at = time.time()

    def read_kv(self, handle: KVHandle, num_tokens: int | None = None, start_token: int = 0):
        """The handle's KV as ``[num_layers, 2, T, num_kv_heads, head_dim]`` on the pool's device."""
        storage = self._require_storage()
        start_token = check_count(start_token, "start_token")
        if num_tokens is not None:
            num_tokens = check_count(num_tokens, "num_tokens", 1)
        with self._lock:
            self._check_handle(handle)
            n = handle.num_tokens - start_token if num_tokens is None else num_tokens
            if n <= 0 or start_token + n > handle.num_tokens:
                raise KVInvalidInputError(
                    f"reading tokens [{start_token}, {start_token + n}) of a handle of {handle.num_tokens}"
                )
            handle.last_access_at = time.time()
            return storage.read_tokens(handle.block_ids, n, start_token)

    def copy_blocks(self, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]) -> None:
        """Copy KV block by block into FREE blocks (staging, defragmentation).

        Raises:
            KVInvalidTypeError: an id that is not an int (floats, bools, strs).
            KVInvalidInputError: an id out of range, lengths that differ, a
                destination listed twice.
            KVBlockImmutableError: a destination that is cached, held or pinned.
            Nothing is copied when any of these is raised.
        """
        storage = self._require_storage()
        bp = self._blocks
        src = bp.check_block_ids(src_block_ids, "src_block_ids")
        dst = bp.check_block_ids(dst_block_ids, "dst_block_ids")
        if len(src) != len(dst):
            raise KVInvalidInputError(
                f"copy_blocks: {len(src)} sources but {len(dst)} destinations"
            )
        if len(set(dst)) != len(dst):
            raise KVInvalidInputError("copy_blocks: a destination block is listed twice")
        with self._lock:
            hashes, ref, pins = bp.block_hashes, bp.ref_counts, bp.pin_counts
            refused = [b for b in dst if hashes[b] is not None or ref[b] or pins[b]]
            if refused:
                raise KVBlockImmutableError(
                    f"copy_blocks: destinations {refused} are cached or in use; "
                    "only free blocks can be overwritten",
                    block_ids=refused,
                )
            storage.copy_blocks(src, dst)
