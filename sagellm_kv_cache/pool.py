"""``KVPool``: the facade an engine holds (seed API), over the block pool.

::

    engine / scheduler / simulator
          |  alloc, alloc_with_prefix, cache_blocks, free, pin, write_kv, read_kv
          v
    KVPool  (lock, handles, validation, stats, hooks)      <- this module
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

from ._pool_info import PoolInfoMixin
from ._pool_kv import PoolKVMixin
from .block_pool import BlockPool
from .checks import check_count, check_metadata, check_num_tokens
from .errors import (
    KVBudgetExceededError,
    KVConfigError,
    KVDoubleFreeError,
    KVHandlePinnedError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVNoVictimError,
    KVRefCountUnderflowError,
)
from .eviction import EvictionPolicy
from .handle import HandleState, KVHandle, KVLayout, MemoryTier, normalize_dtype
from .hashing import check_block_hashes, compute_block_hashes, get_hash_fn, root_hash
from .model_shapes import estimate_pool_bytes, format_bytes, resolve_model_shape
from .storage import KVStorage, ModelShape, normalize_device

_log = logging.getLogger(__name__)

__all__ = ["KVPool", "admission_reason", "check_num_tokens"]


def admission_reason(n_new: int, n_hit: int, obtainable: int, num_blocks: int) -> str | None:
    """The block budget part of admission, one rule for the pool, the scheduler's plan
    and the simulator: ``"too_large"`` when the request's blocks (``n_hit`` cached
    plus ``n_new`` new) exceed the whole pool, ``"no_blocks"`` when more new blocks
    are needed than ``obtainable`` (free plus evictable, less the evictable hits it
    takes), else ``None``."""
    if n_new + n_hit > num_blocks:
        return "too_large"
    if n_new > obtainable:
        return "no_blocks"
    return None


#: the methods ``KVPool`` calls on a hook (``hooks.PoolHook`` has them all as no-ops)
_HOOK_METHODS = ("on_lookup", "on_alloc", "on_free", "on_evict", "on_cleared")


class KVPool(PoolKVMixin, PoolInfoMixin):
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
        if not metadata_only:
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

    def _reset_counters(self) -> None:
        self._num_allocs = 0
        self._num_frees = 0
        self._prefix_requests = 0
        self._prefix_hit_requests = 0
        self._prefix_query_tokens = 0
        self._prefix_hit_tokens = 0
        self._prefix_query_blocks = 0
        self._prefix_hit_blocks = 0

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

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

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

    def _check_handle(self, handle: Any) -> KVHandle:
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
            block_ids = self._blocks.allocate(n)
            handle = KVHandle(
                handle_id=self._next_handle_id(),
                num_tokens=num_tokens,
                block_ids=block_ids,
                block_size=self.block_size,
                dtype=dt,
                layout=lay,
                device=dev,
                tier=self.tier,
                metadata=dict(metadata) if metadata else {},
                pool_id=self.pool_id,
            )
            self._handles[handle.handle_id] = handle
            self._num_allocs += 1
            if self._blocks.hooks:
                now = self.clock()
                for hook in self._blocks.hooks:
                    hook.on_alloc(handle, now)
            self._after()
            return handle

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
            handle = KVHandle(
                handle_id=self._next_handle_id(),
                num_tokens=num_tokens,
                block_ids=block_ids,
                block_size=bs,
                dtype=self.dtype,
                layout=self.layout,
                device=self.device,
                tier=self.tier,
                block_hashes=hashes,
                num_cached_tokens=len(hit) * bs,
                metadata=dict(metadata) if metadata else {},
                pool_id=self.pool_id,
            )
            if request_id is not None:
                handle.metadata["request_id"] = request_id
            self._handles[handle.handle_id] = handle
            self._num_allocs += 1
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

    def _admit(self, n_new: int, hit: list[int], num_tokens: int) -> None:
        """Raise unless ``n_new`` blocks can be had once the ``hit`` blocks are taken.

        Hit blocks that are evictable now stop counting as obtainable once
        taken; a policy that refuses some evictable blocks (TTL, leaf-only) is
        asked how many victims it would give with the hits taken out. Nothing
        is changed here, so a refusal leaves the pool exactly as it was.
        """
        reason, obtainable, got = self._admission(n_new, hit)
        if reason in ("too_large", "no_blocks"):
            raise KVBudgetExceededError(
                f"request of {num_tokens} tokens needs {n_new} new blocks beyond its "
                f"{len(hit)} cached ones; {obtainable} obtainable",
                needed=n_new,
                hit=len(hit),
            )
        if reason == "no_victims":
            need = n_new - self._blocks.num_free
            raise KVNoVictimError(
                f"{self._blocks.policy.name}: request of {num_tokens} tokens needs {need} "
                f"victims beyond {self._blocks.num_free} free blocks; the policy gives {got} "
                "now (the rest are protected or not leaves)",
                needed=need,
                victims=got,
            )

    def _admission(self, n_new: int, hit: Sequence[int]) -> tuple[str | None, int, int]:
        """The admission rule, written once (``alloc_with_prefix``, ``peek_admission``,
        the simulator): ``(reason, obtainable, victims)``; ``reason`` is ``None`` when
        ``n_new`` blocks beyond the cached run ``hit`` can be had now, else
        ``"too_large"`` (more than the whole pool), ``"no_blocks"`` (more than free +
        evictable blocks once the hits are taken) or ``"no_victims"`` (the policy
        refuses some evictable blocks now). Changes nothing; the caller holds the lock."""
        bp = self._blocks
        n_ev_hit = bp.num_evictable_among(hit) if hit else 0
        obtainable = bp.num_available - n_ev_hit
        reason = admission_reason(n_new, len(hit), obtainable, self.num_blocks)
        if reason is not None:
            return reason, obtainable, 0
        need = n_new - bp.num_free
        if need > 0 and bp.policy_may_refuse:
            ev_hit = bp.evictable_among(hit) if n_ev_hit else ()
            got = bp.policy.num_victims(need, ev_hit)
            if got < need:
                return "no_victims", obtainable, got
        return None, obtainable, 0

    def obtainable_blocks(self, hit_block_ids: Sequence[int] = ()) -> int:
        """Blocks an allocation could obtain now beyond ``hit_block_ids`` (a request's
        cached leading run, from ``match_prefix``, which it would take): free plus
        evictable blocks, less the evictable hits. Changes nothing.

        Raises:
            KVInvalidTypeError / KVInvalidInputError: bad block ids.
        """
        with self._lock:
            hit = self._blocks.check_block_ids(hit_block_ids, "hit_block_ids")
            return self._admission(0, hit)[1]

    def peek_admission(self, num_new_blocks: int, hit_block_ids: Sequence[int] = ()) -> str | None:
        """Why allocating ``num_new_blocks`` beyond the cached run ``hit_block_ids``
        would fail now, or ``None`` when it would succeed (the rule ``alloc_with_prefix``
        applies): ``"too_large"``, ``"no_blocks"`` or ``"no_victims"``. Changes nothing.

        Raises:
            KVInvalidTypeError / KVInvalidInputError: a bad count or bad block ids.
        """
        n_new = check_count(num_new_blocks, "num_new_blocks")
        with self._lock:
            hit = self._blocks.check_block_ids(hit_block_ids, "hit_block_ids")
            return self._admission(n_new, hit)[0]

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

    # -- prefix cache --------------------------------------------------------
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
