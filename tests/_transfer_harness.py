"""What the transfer tests share: one small KV geometry, filled pools, and the
views they compare (accounting, receiver hits and digests).

Rank functions of gloo/NIXL tests run in spawned processes; they import this
module like the test modules themselves (``tests`` is on the path there too).
"""

from __future__ import annotations

import hashlib

import torch

from sagellm_kv_cache.errors import KVTransferFailedError
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.storage import ModelShape

SHAPE = ModelShape(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
BS = 4
BPB = SHAPE.bytes_per_block(BS)  # 256 bytes per block


def prompt(i: int, n: int = 26) -> list[int]:
    return [i * 1000 + t for t in range(n)]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def make_pool(num_blocks: int = 64, shape: ModelShape = SHAPE, bs: int = BS) -> KVPool:
    return KVPool(num_blocks=num_blocks, block_size=bs, model_shape=shape)


def fill(pool: KVPool, tokens: list[int], seed: int) -> tuple:
    """Allocate ``tokens``, write seeded KV, cache the blocks; returns (handle, kv)."""
    h, _ = pool.alloc_with_prefix(tokens)
    g = torch.Generator().manual_seed(seed)
    shape = pool.model_shape
    assert shape is not None
    kv = torch.randn(
        shape.num_layers, 2, len(tokens), shape.num_kv_heads, shape.head_dim, generator=g
    ).half()
    pool.write_kv(h, kv)
    pool.cache_blocks(h)
    return h, kv


def accounting(pool: KVPool) -> dict:
    pool.check_invariants()
    s = pool.get_stats()
    return {k: s[k] for k in ("free_blocks", "used_blocks", "cached_blocks", "num_handles")}


def receiver_view(pool: KVPool, prompts: list[list[int]]) -> list[dict]:
    """For each prompt: hit tokens on the receiver and the digest of the hit KV."""
    out = []
    for tokens in prompts:
        h, hit = pool.alloc_with_prefix(tokens)
        out.append({"hit": hit, "kv": digest(pool.read_kv(h, num_tokens=hit)) if hit else None})
        pool.free(h)
    return out


def error_of(exc: KVTransferFailedError) -> dict:
    return {"type": type(exc).__name__, "code": exc.code, "msg": str(exc)}
