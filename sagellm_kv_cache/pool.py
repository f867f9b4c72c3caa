"""``KVPool``: the facade an engine holds (seed API), over the block pool.

::

    engine / scheduler / simulator
          |  alloc, alloc_with_prefix, cache_blocks, free, pin, write_kv, read_kv
          v
    KVPool  (lock, handles, validation, stats, hooks)      <- this module, with its parts:
          |   _pool_admission (may n blocks be had), _pool_cache (hashes, cache_blocks,
          |   match_prefix, invalidate), _pool_kv (write_kv, read_kv), _pool_info (stats,
          |   retention), _pool_base (the state they share, the handle check)
          |
          +-- BlockPool  (ref counts, free queue, hash map)  block_pool.py
          |       +-- EvictionPolicy (victim order)           eviction/
          +-- KVStorage  (torch tensors; absent when metadata-only) storage.py

Typical engine-facing use::

    pool = KVPool(max_tokens=65536, model_shape=ModelShape(32, 8, 128, "bfloat16"))
    handle, num_hit_tokens = pool.alloc_with_prefix(prompt_token_ids)
    # compute KV for tokens [num_hit_tokens:], then
    pool.write_kv(handle, kv_new, start_token=num_hit_tokens)
    pool.cache_blocks(handle)          # its full blocks become reusable
    ...
    pool.free(handle)                  # blocks stay cached, evictable

Budget: the pool never holds more than ``num_blocks`` blocks; tokens are
accounted in whole blocks (``get_allocated_tokens()`` is blocks in use x
``block_size``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ._pool_admission import PoolAdmissionMixin, admission_reason
from ._pool_cache import PoolCacheMixin
from ._pool_info import PoolInfoMixin
from ._pool_kv import PoolKVMixin
from .block_pool import BlockPool
from .checks import check_metadata, check_num_tokens
from .errors import (
    KVBudgetExceededError,
    KVConfigError,
    KVHandlePinnedError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVRefCountUnderflowError,
)
from .eviction import EvictionPolicy
from .handle import HandleState, KVHandle, KVLayout, MemoryTier, normalize_dtype
from .hashing import get_hash_fn, root_hash
from .model_shapes import estimate_pool_bytes, format_bytes, resolve_model_shape
from .storage import KVStorage, ModelShape, normalize_device

_log = logging.getLogger(__name__)

__all__ = ["KVPool", "admission_reason", "check_num_tokens"]

#: the methods ``KVPool`` calls on a hook (``hooks.PoolHook`` has them all as no-ops)
_HOOK_METHODS = ("on_lookup", "on_alloc", "on_free", "on_evict", "on_cleared")


class KVPool(PoolCacheMixin, PoolAdmissionMixin, PoolKVMixin, PoolInfoMixin):
    """A budgeted pool of paged KV blocks with prefix caching.

    Size it with exactly one of ``max_tokens``, ``num_blocks`` or ``max_bytes``
    (the last needs ``model_shape``). With a ``model_shape`` the pool holds
    real KV tensors on ``device``; without one (or with ``metadata_only=True``)
    it runs the same bookkeeping with no tensors (trace replay).

    Args:
        max_tokens: token budget (rounded down to whole blocks).
        block_size: tokens per block (default 16).
        num_blocks: block budget, instead of ``max_tokens``.
        max_bytes: byte budget, instead of ``max_tokens``; needs ``model_shape``.
        model_shape: ``ModelShape`` or what ``model_shapes.resolve_model_shape`` reads.
        device: ``"cpu"`` or ``"cuda:N"``.
        dtype: KV dtype; defaults to the model shape's (``"float16"`` otherwise).
        layout: ``"NHD"`` or ``"HND"`` block layout of the storage.
        eviction_policy: policy name (``"lru"``...), enum, class or instance.
        enable_prefix_caching: register full blocks under their hashes.
        hash_fn: ``"sha256"`` (default), ``"blake2b"`` or ``"xxh3_128"``.
        extra_keys: salt / namespace mixed into every request's first block hash.
        metadata_only: force no tensors even with a model shape.
        pin_memory: page-lock CPU storage when CUDA is present.
        clock: monotonic seconds for policies and hooks (a simulator's clock).
        debug: check all invariants after every mutating call (slow).

    Thread safety: one re-entrant lock covers every public method, so the
    budget check and the allocation are atomic and handle/block state is
    consistent between calls; ``write_kv``/``read_kv`` hold it while they
    copy, so a block cannot be freed and reused under a copy in flight.
    """

    def __init__(
        self,
        max_tokens: int | None = None,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_bytes: int | None = None,
        model_shape: ModelShape | str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        layout: str = "NHD",
        eviction_policy: str | EvictionPolicy = "lru",
        enable_prefix_caching: bool = True,
        hash_fn: str = "sha256",
        extra_keys: Any = None,
        metadata_only: bool | None = None,
        pin_memory: bool = False,
        clock: Callable[[], float] | None = None,
        debug: bool = False,
        tier: str | None = None,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise KVConfigError(f"block_size must be a positive int, got {block_size!r}")
        if isinstance(model_shape, str):  # a preset, "32,8,128,bf16" or a config.json
            model_shape = resolve_model_shape(model_shape)
        self.block_size = block_size
        self.device = normalize_device(device)
        self.dtype = normalize_dtype(dtype or (model_shape.dtype if model_shape else "float16"))
        if model_shape is not None and self.dtype != model_shape.dtype:
            model_shape = ModelShape(
                model_shape.num_layers, model_shape.num_kv_heads, model_shape.head_dim, self.dtype
            )
        try:
            self.layout = KVLayout(str(layout).upper()).value
        except ValueError:
            raise KVConfigError(f"unknown layout {layout!r}; use 'NHD' or 'HND'") from None
        self.model_shape = model_shape
        given = [
            n
            for n, v in (
                ("max_tokens", max_tokens),
                ("num_blocks", num_blocks),
                ("max_bytes", max_bytes),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise KVConfigError(
                f"size the pool with exactly one of max_tokens, num_blocks, max_bytes (got {given or 'none'})"
            )
        if max_tokens is not None:
            check = check_num_tokens(max_tokens, "max_tokens")
            n_blocks = check // block_size
        elif num_blocks is not None:
            n_blocks = check_num_tokens(num_blocks, "num_blocks")
        else:
            max_bytes = check_num_tokens(max_bytes, "max_bytes")
            if model_shape is None:
                raise KVConfigError("max_bytes needs a model_shape to convert bytes into blocks")
            n_blocks = max_bytes // model_shape.bytes_per_block(block_size)
        if n_blocks < 1:
            raise KVConfigError(f"budget holds no full block of {block_size} tokens")
        self.num_blocks = n_blocks
        self.max_tokens = n_blocks * block_size
        if metadata_only is None:
            metadata_only = model_shape is None
        if not metadata_only and model_shape is None:
            raise KVConfigError(
                "a pool with KV tensors needs a model_shape (layers, KV heads, head dim)"
            )
        self.metadata_only = metadata_only
        self.tier = tier or (
            MemoryTier.GPU.value if self.device.startswith("cuda") else MemoryTier.CPU.value
        )
        self.pool_id = str(uuid.uuid4())
        self._handle_prefix = str(uuid.uuid4())[:24]  # "xxxxxxxx-xxxx-4xxx-yxxx-"
        self._handle_counter = 0
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn_name = hash_fn
        self._hash_fn = get_hash_fn(hash_fn)
        self.extra_keys = extra_keys
        self._root = root_hash(extra_keys, self._hash_fn)
        self.clock = clock or time.monotonic
        self.debug = debug
        self._lock = threading.RLock()
        self._blocks = BlockPool(
            n_blocks,
            block_size,
            eviction_policy,
            enable_caching=enable_prefix_caching,
            clock=self.clock,
        )
        self.storage: KVStorage | None = None
        if model_shape is not None and not metadata_only:
            nbytes = n_blocks * model_shape.bytes_per_block(block_size)
            _log.info(
                "KVPool allocates %s of KV tensors on %s: %d blocks x %d tokens x %d bytes/token",
                format_bytes(nbytes), self.device, n_blocks, block_size, model_shape.bytes_per_token,
            )  # fmt: skip
            self.storage = KVStorage(
                n_blocks, block_size, model_shape, self.device, self.layout, pin_memory=pin_memory
            )
        self._handles: dict[str, KVHandle] = {}
        self._reset_counters()

    #: ``KVPool.estimate_bytes(65536, model_shape="llama-3-8b")``: the bytes of KV
    #: tensors a pool of these arguments would allocate, without allocating them.
    estimate_bytes = staticmethod(estimate_pool_bytes)

    # -- introspection -------------------------------------------------------
    @property
    def block_pool(self) -> BlockPool:
        """The mechanism underneath (read-only use: tests, policies, simulators)."""
        return self._blocks

    @property
    def lock(self) -> threading.RLock:
        """The re-entrant lock every public method holds (a pool-bound ``PrefixCache``
        shares it)."""
        return self._lock

    @property
    def policy(self) -> EvictionPolicy:
        return self._blocks.policy

    @property
    def hooks(self) -> list:
        return self._blocks.hooks

    def add_hook(self, hook: Any) -> None:
        """Attach an observer (see ``hooks.PoolHook``; it needs the ``on_*`` methods the
        pool calls, which subclassing ``PoolHook`` provides)."""
        missing = [m for m in _HOOK_METHODS if not callable(getattr(hook, m, None))]
        if missing:
            raise KVInvalidTypeError(
                f"a hook needs {', '.join(missing)} (subclass hooks.PoolHook); "
                f"got {type(hook).__name__}"
            )
        with self._lock:
            self._blocks.hooks.append(hook)

    def remove_hook(self, hook: Any) -> None:
        with self._lock:
            if not any(h is hook for h in self._blocks.hooks):
                raise KVInvalidInputError(f"{type(hook).__name__} is not attached to this pool")
            self._blocks.hooks.remove(hook)

    def get_handle(self, handle_id: str) -> KVHandle:
        if not isinstance(handle_id, str):
            raise KVInvalidTypeError(f"handle_id must be a str, got {type(handle_id).__name__}")
        with self._lock:
            try:
                return self._handles[handle_id]
            except KeyError:
                raise KVInvalidHandleError(f"no live handle {handle_id!r} in this pool") from None

    @property
    def handles(self) -> list[KVHandle]:
        with self._lock:
            return list(self._handles.values())

    # -- validation ----------------------------------------------------------
    def _next_handle_id(self) -> str:
        """A UUID4-formatted id: this pool's random 80-bit prefix + a 48-bit counter.

        Unique across pools (random prefix) and within one (counter), and about
        10x cheaper than ``uuid.uuid4()`` on the allocation path.
        """
        self._handle_counter += 1
        return f"{self._handle_prefix}{self._handle_counter & 0xFFFFFFFFFFFF:012x}"

    def _check_attrs(self, device: Any, dtype: Any, layout: Any) -> tuple[str, str, str]:
        if device is None and dtype is None and layout is None:
            return self.device, self.dtype, self.layout
        dev = self.device if device is None else normalize_device(device)
        dt = self.dtype if dtype is None else normalize_dtype(dtype)
        lay = self.layout
        if layout is not None:
            try:
                lay = KVLayout(str(getattr(layout, "value", layout)).upper()).value
            except ValueError:
                raise KVConfigError(f"unknown layout {layout!r}; use 'NHD' or 'HND'") from None
        if not self.metadata_only and (dev, dt, lay) != (self.device, self.dtype, self.layout):
            raise KVConfigError(
                f"this pool stores {self.dtype} KV in layout {self.layout} on {self.device}; "
                f"got device={dev}, dtype={dt}, layout={lay}"
            )
        return dev, dt, lay

    # -- allocation ----------------------------------------------------------
    def alloc(
        self,
        num_tokens: int,
        device: str | None = None,
        dtype: Any = None,
        layout: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> KVHandle:
        """Allocate blocks for ``num_tokens`` tokens (no prefix reuse).

        Raises:
            KVInvalidTypeError / KVInvalidInputError: bad ``num_tokens``.
            KVConfigError: unknown device/dtype/layout, or not this pool's.
            KVBudgetExceededError: more than the pool could ever hold.
            KVPoolFullError: not enough free + evictable blocks now.
        """
        num_tokens = check_num_tokens(num_tokens)
        check_metadata(metadata)
        dev, dt, lay = self._check_attrs(device, dtype, layout)
        n = self._num_blocks_for(num_tokens)
        with self._lock:
            if n > self.num_blocks:
                raise KVBudgetExceededError(
                    f"{num_tokens} tokens need {n} blocks; the pool has {self.num_blocks}",
                    needed=n,
                    total=self.num_blocks,
                )
            handle = self._new_handle(
                num_tokens, self._blocks.allocate(n), metadata, dt, lay, dev, [], 0
            )
            if self._blocks.hooks:
                now = self.clock()
                for hook in self._blocks.hooks:
                    hook.on_alloc(handle, now)
            self._after()
            return handle

    def _new_handle(
        self,
        num_tokens: int,
        block_ids: list[int],
        metadata: Any,
        dtype: str,
        layout: str,
        device: str,
        block_hashes: list,
        num_cached_tokens: int,
    ) -> KVHandle:
        """A live handle over ``block_ids`` (allocated), registered and counted."""
        handle = KVHandle(
            handle_id=self._next_handle_id(),
            num_tokens=num_tokens,
            block_ids=block_ids,
            block_size=self.block_size,
            dtype=dtype,
            layout=layout,
            device=device,
            tier=self.tier,
            block_hashes=block_hashes,
            num_cached_tokens=num_cached_tokens,
            metadata=dict(metadata) if metadata else {},
            pool_id=self.pool_id,
        )
        self._handles[handle.handle_id] = handle
        self._num_allocs += 1
        return handle

    def alloc_with_prefix(
        self,
        tokens: Any = None,
        *,
        block_hashes: Sequence[Hashable] | None = None,
        num_tokens: int | None = None,
        extra_keys: Any = None,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> tuple[KVHandle, int]:
        """The engine-facing path: reuse the cached prefix, allocate the rest.

        Pass the prompt's ``tokens`` (hashed here), or precomputed
        ``block_hashes`` of its full blocks plus ``num_tokens`` (trace replay).
        The returned handle's leading blocks are the cache hits (ref counted:
        never evicted while the handle lives), the rest are fresh blocks.

        Returns:
            ``(handle, num_hit_tokens)``; ``num_hit_tokens`` is a multiple of
            ``block_size`` and may equal the prompt length when every block hit.

        Raises:
            KVBudgetExceededError: the request cannot fit even after evicting
                every evictable block (the pool is unchanged).
            KVNoVictimError: it would fit, but the policy refuses the victims it
                needs now (TTL-protected, or not leaves under ``leaf:*``); the
                pool is unchanged (refs, policy order, stats).
            KVInvalidTypeError / KVInvalidInputError: bad tokens, hashes, counts,
                ``metadata`` or ``request_id``; nothing is allocated.
        """
        check_metadata(metadata, request_id)
        num_tokens, hashes = self._prompt_hashes(tokens, block_hashes, num_tokens, extra_keys)
        bs = self.block_size
        n_total = -(-num_tokens // bs)
        with self._lock:
            bp = self._blocks
            hit = bp.match_prefix(hashes) if self.enable_prefix_caching else []
            n_new = n_total - len(hit)
            if n_new > bp.num_free:
                self._admit(n_new, hit, num_tokens)
            if hit:
                bp.touch(hit)
            block_ids = hit + bp.allocate(n_new)
            handle = self._new_handle(
                num_tokens, block_ids, metadata, self.dtype, self.layout, self.device,
                hashes, len(hit) * bs,
            )  # fmt: skip
            if request_id is not None:
                handle.metadata["request_id"] = request_id
            self._prefix_requests += 1
            self._prefix_query_tokens += num_tokens
            self._prefix_query_blocks += len(hashes)
            if hit:
                self._prefix_hit_requests += 1
                self._prefix_hit_tokens += len(hit) * bs
                self._prefix_hit_blocks += len(hit)
            if bp.hooks:
                now = self.clock()
                for hook in bp.hooks:
                    hook.on_lookup(request_id, block_ids, len(hit), n_total, now)
                    hook.on_alloc(handle, now)
            self._after()
            return handle, len(hit) * bs

    def free(self, handle: KVHandle) -> None:
        """Release a handle. Its cached blocks stay reusable until evicted.

        Raises:
            KVDoubleFreeError: already freed. KVInvalidHandleError: not this pool's.
            KVHandlePinnedError: pinned (unpin first).
        """
        with self._lock:
            self._check_handle(handle)
            if handle.pin_count:
                raise KVHandlePinnedError(
                    f"handle {handle.handle_id} is pinned {handle.pin_count}x; unpin it first"
                )
            self._blocks.release(handle.block_ids)
            handle.state = HandleState.FREED
            handle.ref_count = 0
            del self._handles[handle.handle_id]
            self._num_frees += 1
            if self._blocks.hooks:
                now = self.clock()
                for hook in self._blocks.hooks:
                    hook.on_free(handle, now)
            self._after()

    def pin(self, handle: KVHandle) -> None:
        """Pin a handle: it cannot be freed and its blocks are never evicted until unpinned."""
        with self._lock:
            self._check_handle(handle)
            self._blocks.pin(handle.block_ids)
            handle.pin_count += 1
            self._after()

    def unpin(self, handle: KVHandle) -> None:
        with self._lock:
            self._check_handle(handle)
            if handle.pin_count <= 0:
                raise KVRefCountUnderflowError(f"handle {handle.handle_id} is not pinned")
            self._blocks.unpin(handle.block_ids)
            handle.pin_count -= 1
            self._after()

    # -- budget --------------------------------------------------------------
    def can_admit(self, num_tokens: int) -> bool:
        """Would ``alloc(num_tokens)`` succeed now (counting evictable blocks)?"""
        num_tokens = check_num_tokens(num_tokens)
        with self._lock:
            return self._num_blocks_for(num_tokens) <= self._blocks.num_available

    def get_allocated_tokens(self) -> int:
        """Token slots in blocks that are in use (held or pinned)."""
        with self._lock:
            return self._blocks.num_used * self.block_size

    def get_available_tokens(self) -> int:
        """Token slots an allocation could get now: free plus evictable blocks."""
        with self._lock:
            return self._blocks.num_available * self.block_size

    def reset(self) -> None:
        """Free every handle (they become invalid), drop the cache, zero the counters."""
        with self._lock:
            for h in self._handles.values():
                h.state = HandleState.FREED
                h.ref_count = 0
                h.pin_count = 0
            self._handles.clear()
            self._blocks.reset()
            self._reset_counters()

    def __repr__(self) -> str:
        return (
            f"KVPool(blocks={self.num_blocks}x{self.block_size}, used={self._blocks.num_used}, "
            f"evictable={self._blocks.num_evictable}, device={self.device}, "
            f"{'metadata-only' if self.metadata_only else self.dtype})"
        )
