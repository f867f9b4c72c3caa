"""``KVHandle``: what a caller holds for one allocation in a pool.

A handle names the blocks it references (integer ids into its pool), how many
tokens it covers, and the storage attributes of those blocks. It does not own
the tensors: the pool does; ``pool.read_kv(handle)`` / ``pool.write_kv`` move
data in and out.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import KVConfigError

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

    def __post_init__(self) -> None:
        if not self.last_access_at:
            self.last_access_at = self.created_at

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def is_pinned(self) -> bool:
        return self.pin_count > 0

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
