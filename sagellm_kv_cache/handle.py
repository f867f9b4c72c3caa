"""``KVHandle``: what a caller holds for one allocation in a pool.

A handle names the blocks it references (integer ids into its pool), how many
tokens it covers, and the storage attributes of those blocks. It does not own
the tensors: the pool does; ``pool.read_kv(handle)`` / ``pool.write_kv`` move
data in and out.
"""

from __future__ import annotations

import enum
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import KVConfigError, KVInvalidInputError, KVRefCountUnderflowError

__all__ = ["KV_DTYPES", "HandleState", "KVHandle", "KVLayout", "MemoryTier", "normalize_dtype"]


class HandleState(enum.StrEnum):
    """Lifecycle of a handle."""

    ALLOCATED = "allocated"  # blocks held (ref counted), KV may not be written yet
    CACHED = "cached"  # its full blocks are registered in the prefix cache
    FREED = "freed"  # released; blocks may stay cached but the handle is dead


class MemoryTier(enum.StrEnum):
    """Where the blocks of a handle live."""

    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"
    REMOTE = "remote"


class KVLayout(enum.StrEnum):
    """Memory layout of one block in the pool's storage (see ``storage.py``).

    ``NHD``: [block_size, num_kv_heads, head_dim] (vLLM's flash-attn layout).
    ``HND``: [num_kv_heads, block_size, head_dim] (FlashInfer / TRT-LLM style).
    """

    NHD = "NHD"
    HND = "HND"


#: canonical dtype name -> (element size in bytes, aliases)
KV_DTYPES: dict[str, tuple[int, tuple[str, ...]]] = {
    "float16": (2, ("fp16", "half", "torch.float16")),
    "bfloat16": (2, ("bf16", "torch.bfloat16")),
    "float32": (4, ("fp32", "float", "torch.float32")),
    "fp8_e4m3": (1, ("float8_e4m3fn", "torch.float8_e4m3fn", "fp8")),
    "fp8_e5m2": (1, ("float8_e5m2", "torch.float8_e5m2")),
}
_DTYPE_ALIASES = {alias: name for name, (_, aliases) in KV_DTYPES.items() for alias in aliases}
_DTYPE_ALIASES.update({name: name for name in KV_DTYPES})


_TOUCH_LOCK = threading.Lock()
_LAST_TOUCH = [0.0]


def _touch_stamp() -> float:
    """``time.time()``, but strictly increasing across calls in this process, so
    handles touched one after another are ordered even within one clock tick."""
    with _TOUCH_LOCK:
        now = time.time()
        if now <= _LAST_TOUCH[0]:
            now = math.nextafter(_LAST_TOUCH[0], math.inf)
        _LAST_TOUCH[0] = now
        return now


def normalize_dtype(dtype: Any) -> str:
    """Canonical dtype name for a string or a torch dtype (``"fp16"`` -> ``"float16"``)."""
    key = str(dtype)
    try:
        return _DTYPE_ALIASES[key]
    except KeyError:
        raise KVConfigError(
            f"unsupported KV dtype {dtype!r}; choose one of {sorted(KV_DTYPES)}"
        ) from None


@dataclass(slots=True, eq=False)
class KVHandle:
    """A reference to KV blocks allocated in a pool.

    Attributes:
        handle_id: unique id (UUID4 string).
        num_tokens: tokens this handle covers.
        block_ids: ids of its blocks in the pool, in token order.
        block_hashes: hashes of its full blocks, when known (prefix caching).
        num_cached_tokens: leading tokens that were prefix-cache hits at allocation.
        dtype / layout / device / tier: storage attributes of its blocks.
        state: ``HandleState``.
        pin_count: pins held; a pinned handle cannot be freed.
        ref_count: 1 while alive, 0 once freed (block refs live in the pool).
        created_at / last_access_at: wall-clock seconds (``time.time()``).
        metadata: free-form caller data (request id, model...).
        pool_id: id of the pool that issued it (guards against cross-pool use).
        access_count: times ``touch()`` was called.

    Seed methods (``touch``, ``pin``/``unpin``, ``incr_ref``/``decr_ref``,
    ``is_evictable``, ``is_local``, ``node_rank``, ``estimate_size_bytes``,
    ``create``) keep the seed's signatures. The counting ones act on the
    handle's own counters, which is what ``EvictionManager`` reads; a *live
    handle issued by a KVPool* refuses them (``KVInvalidInputError``): its
    pins and references are the pool's (``pool.pin(handle)``, ``pool.free``),
    and changing only the handle would let them disagree.
    """

    num_tokens: int
    block_ids: list[int] = field(default_factory=list)
    block_size: int = 16
    dtype: str = "float16"
    layout: str = KVLayout.NHD.value
    device: str = "cpu"
    tier: str = MemoryTier.CPU.value
    handle_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    block_hashes: list = field(default_factory=list)
    num_cached_tokens: int = 0
    state: HandleState = HandleState.ALLOCATED
    pin_count: int = 0
    ref_count: int = 1
    created_at: float = field(default_factory=time.time)
    last_access_at: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    pool_id: str | None = None
    access_count: int = 0

    def __post_init__(self) -> None:
        if not self.last_access_at:
            self.last_access_at = self.created_at

    # -- seed API --------------------------------------------------------------
    @classmethod
    def create(
        cls,
        num_tokens: int,
        *,
        dtype: Any = "float16",
        layout: Any = KVLayout.NHD.value,
        device: str = "cpu",
        request_id: str | None = None,
        session_id: str | None = None,
        node_rank: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> KVHandle:
        """Seed factory: a standalone handle (no pool, no blocks), e.g. for
        ``EvictionManager`` or a predictor. ``request_id`` / ``session_id`` /
        ``node_rank`` go into ``metadata``."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise KVInvalidInputError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        if node_rank is not None and (
            isinstance(node_rank, bool) or not isinstance(node_rank, int) or node_rank < 0
        ):
            raise KVInvalidInputError(f"node_rank must be an int >= 0 or None, got {node_rank!r}")
        md = dict(metadata or {})
        for key, value in (
            ("request_id", request_id),
            ("session_id", session_id),
            ("node_rank", node_rank),
        ):
            if value is not None:
                md[key] = value
        lay = getattr(layout, "value", layout)
        return cls(
            num_tokens=num_tokens,
            dtype=normalize_dtype(getattr(dtype, "value", dtype)),
            layout=str(lay),
            device=device,
            metadata=md,
        )

    def _check_standalone(self, what: str) -> None:
        if self.pool_id is not None and self.state is not HandleState.FREED:
            raise KVInvalidInputError(
                f"handle {self.handle_id} belongs to a live pool allocation; "
                f"use the pool for {what} (pool.pin / pool.unpin / pool.free)"
            )

    def touch(self) -> None:
        """Mark an access now: ``last_access_at`` (strictly increasing across
        touches in this process) and ``access_count``."""
        self.last_access_at = _touch_stamp()
        self.access_count += 1

    def is_evictable(self) -> bool:
        """No reference and no pin: ``EvictionManager`` may select it."""
        return self.ref_count <= 0 and self.pin_count <= 0

    def _step(self, field: str, delta: int, what: str) -> int:
        """Add ``delta`` to a standalone handle's ``ref_count`` or ``pin_count``; the new count."""
        self._check_standalone(what)
        n = getattr(self, field) + delta
        if n < 0:
            raise KVRefCountUnderflowError(
                f"handle {self.handle_id}: "
                + ("ref count is already 0" if field == "ref_count" else "is not pinned")
            )
        setattr(self, field, n)
        return n

    def incr_ref(self) -> int:
        """One more reference; returns the new count."""
        return self._step("ref_count", 1, "references")

    def decr_ref(self) -> int:
        """One reference less; returns the new count (KVRefCountUnderflowError at 0)."""
        return self._step("ref_count", -1, "references")

    def pin(self) -> int:
        """One more pin (a pinned handle is never an eviction victim); returns the count."""
        return self._step("pin_count", 1, "pins")

    def unpin(self) -> int:
        """One pin less; returns the count (KVRefCountUnderflowError when not pinned)."""
        return self._step("pin_count", -1, "pins")

    @property
    def node_rank(self) -> int | None:
        """Rank of the node holding the KV (``metadata["node_rank"]``; None: local)."""
        r = self.metadata.get("node_rank") if self.metadata else None
        return r if isinstance(r, int) and not isinstance(r, bool) else None

    def is_local(self, current_rank: int = 0) -> bool:
        """Is the KV on ``current_rank`` (a handle without a rank is local)?"""
        r = self.node_rank
        return r is None or r == current_rank

    def estimate_size_bytes(self, head_dim: int = 128, num_heads: int = 32) -> int:
        """K and V bytes of one layer: ``2 * num_tokens * num_heads * head_dim * itemsize``."""
        for name, v in (("head_dim", head_dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise KVInvalidInputError(f"{name} must be an int > 0, got {v!r}")
        itemsize = KV_DTYPES[normalize_dtype(self.dtype)][0]
        return 2 * self.num_tokens * num_heads * head_dim * itemsize

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def is_freed(self) -> bool:
        return self.state is HandleState.FREED

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict; bytes hashes are hex-encoded."""
        return {
            "handle_id": self.handle_id,
            "num_tokens": self.num_tokens,
            "block_ids": list(self.block_ids),
            "block_size": self.block_size,
            "block_hashes": [h.hex() if isinstance(h, bytes) else h for h in self.block_hashes],
            "num_cached_tokens": self.num_cached_tokens,
            "dtype": self.dtype,
            "layout": self.layout,
            "device": self.device,
            "tier": self.tier,
            "state": self.state.value,
            "pin_count": self.pin_count,
            "ref_count": self.ref_count,
            "created_at": self.created_at,
            "last_access_at": self.last_access_at,
            "metadata": dict(self.metadata),
            "pool_id": self.pool_id,
            "access_count": self.access_count,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVHandle:
        """Inverse of ``to_dict`` (hex strings come back as bytes hashes)."""
        d = dict(data)
        d["block_hashes"] = [
            bytes.fromhex(h) if isinstance(h, str) else h for h in d.get("block_hashes", [])
        ]
        d["state"] = HandleState(d.get("state", HandleState.ALLOCATED.value))
        d["block_ids"] = list(d.get("block_ids", []))
        d["metadata"] = dict(d.get("metadata") or {})
        return cls(**d)

    def __repr__(self) -> str:
        return (
            f"KVHandle(id={self.handle_id[:8]}, tokens={self.num_tokens}, "
            f"blocks={len(self.block_ids)}, cached_tokens={self.num_cached_tokens}, "
            f"state={self.state.value}, device={self.device})"
        )
