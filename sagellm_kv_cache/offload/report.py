"""What a ``KVOffloadManager`` reports about itself: stats, invariants, a debugging read.

Functions over the manager's public surface, called by it under its lock
(after the queued copies settled).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from ..errors import KVCacheMissError, KVConfigError
from .staging import Buf, as_tensor

if TYPE_CHECKING:
    from .manager import KVOffloadManager

__all__ = ["check_chain", "read_cached_block", "stats_report"]


def stats_report(m: KVOffloadManager) -> dict[str, Any]:
    """Per-tier counters and hit ratios (block and token): ``get_stats``."""
    tiers = {}
    qb, qt = m.query_blocks, m.query_tokens
    for name in m.tier_names:
        s = m.tier_stats(name).to_dict()
        pool = m.device.block_pool if name == m.device_name else m.tier(name).pool
        s["resident_blocks"] = pool.num_cached
        s["used_blocks"] = pool.num_used
        s["block_hit_ratio"] = s["hit_blocks"] / qb if qb else 0.0
        s["hit_tokens"] = s["hit_blocks"] * m.block_size
        s["token_hit_ratio"] = s["hit_tokens"] / qt if qt else 0.0
        tiers[name] = s
    hit_blocks = sum(s["hit_blocks"] for s in tiers.values())
    nr = m.num_requests
    return {
        "tiers": tiers,
        "requests": nr,
        "query_blocks": qb,
        "query_tokens": qt,
        "hit_blocks": hit_blocks,
        "block_hit_ratio": hit_blocks / qb if qb else 0.0,
        "token_hit_ratio": hit_blocks * m.block_size / qt if qt else 0.0,
        "request_hit_ratio": m.num_hit_requests / nr if nr else 0.0,
        "write_policy": m.write_policy,
        "admit_after_hits": m.admit_after_hits,
        "promote_on_hit": m.promote_on_hit,
    }


def check_chain(m: KVOffloadManager) -> None:
    """Every tier within budget; exclusive chains hold each block once; the files
    of a disk tier are its index: ``check_invariants``."""
    m.device.check_invariants()
    for t in m.tiers:
        t.check_invariants()
        if t.disk is not None:
            on_disk = set(t.disk.keys())
            assert on_disk == set(t.pool.cached), f"tier {t.name}: files differ from index"
    if m.promote_on_hit:
        seen: set = set(m.device.block_pool.cached)
        for t in m.tiers:
            both = seen & set(t.pool.cached)
            assert not both, f"exclusive chain holds {len(both)} blocks twice (tier {t.name})"
            seen |= set(t.pool.cached)


def read_cached_block(m: KVOffloadManager, block_hash: Hashable) -> tuple[str, Any]:
    """``(tier name, tensor [L, 2, 1, <block dims>])`` of the first tier holding a block:
    ``read_block``. A debugging read is not counted as traffic.

    Raises:
        KVCacheMissError: no tier holds it.
        KVConfigError: the manager is metadata-only.
    """
    storage = m.device.storage
    if storage is None:
        raise KVConfigError("this manager is metadata-only")
    b = m.device.block_pool.cached.get(block_hash)
    if b is not None:
        return m.device_name, storage.read_blocks([b])
    for tier in m.tiers:
        if block_hash in tier:
            buf = Buf("debug")
            step = tier.read_step([block_hash], buf)
            assert step is not None
            step.run(None)  # a failed read raises its typed error
            tier.stats.blocks_out -= 1
            tier.stats.bytes_out -= m.block_nbytes
            dims = (*storage.kv.shape[:2], 1, *storage.kv.shape[3:])
            return tier.name, as_tensor(buf.data, dims, storage.storage_dtype)
    raise KVCacheMissError(f"no tier holds block {block_hash!r}")
