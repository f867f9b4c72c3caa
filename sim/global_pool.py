"""A global KV pool shared by a fleet's instances (Mooncake-store style), on the sim clock.

Every instance keeps its own device cache (``sim.core.PoolInstance``); one
shared remote tier, a metadata-only ``KVPool`` of ``global_blocks`` under the
same eviction policy, receives every prefill's full blocks (a put: blocks
already there are refreshed, the rest allocated, evicting its own victims).
A request starting on instance k::

    local  = leading run cached on k                     (free: already on the device)
    remote = leading run in the global pool beyond local (loaded over the link)
    hit    = local + remote;  recompute the rest
    load_s = link.load_s(remote x bytes_per_block)
    prefill_s = ttft_model(load_s, cost.prefill_s(uncached), layers, overlap)

The remote blocks are copied into k's device cache (they take local blocks
like computed ones and are cached there when the prefill ends). The default
link is an illustrative RDMA figure (``GLOBAL_LINK``: 25 GB/s, 20 us per
transfer), not a measurement; pass your own ``sim.tiered.Link``.
"""

from __future__ import annotations

from typing import Any

from .instances import LayerwiseLoad, PoolInstance, metadata_pool
from .tiered import Link

__all__ = ["GLOBAL_LINK", "GlobalPool", "GlobalPoolInstance"]

#: default link from the global pool into a device (illustrative, 200 Gb/s RDMA class)
GLOBAL_LINK = Link(25e9, 20e-6)


class GlobalPool:
    """The shared tier: a metadata-only ``KVPool``; ``match`` peeks, ``put`` writes."""

    def __init__(self, capacity_blocks: int, block_size: int, policy: Any, clock: Any) -> None:
        self.pool = metadata_pool(capacity_blocks, block_size, policy, clock)
        self.bp = self.pool.block_pool
        self.capacity_blocks = capacity_blocks
        self.cached = self.bp.cached  # hash -> block (the union bound reads it)

    def match(self, hs: list) -> list[int]:
        return self.bp.match_prefix(hs)

    def read(self, ids: list[int]) -> None:
        """A fetch: the blocks' recency is refreshed (a reference taken and dropped)."""
        if ids:
            self.bp.touch(ids)
            self.bp.release(ids)

    def put(self, hs: list) -> None:
        """Store a prefill's full blocks (at most the pool's size, leading first)."""
        bp = self.bp
        hs = hs[: self.capacity_blocks]
        if not hs:
            return
        hit = bp.match_prefix(hs)
        if hit:
            bp.touch(hit)
        need = len(hs) - len(hit)
        if need > bp.num_available:  # nothing else holds references: never the case
            if hit:
                bp.release(hit)
            return
        ids = hit + bp.allocate(need) if need else hit
        bp.cache_blocks(ids, hs, len(hit))
        bp.release(ids)


class GlobalPoolInstance(LayerwiseLoad, PoolInstance):
    """A ``PoolInstance`` whose misses look in the shared ``GlobalPool`` before recomputing."""

    tier_names = ("gpu", "global")

    def __init__(
        self,
        capacity_blocks: int,
        block_size: int,
        policy: Any,
        clock: Any,
        cost: Any,
        n: int,
        *,
        shared: GlobalPool,
        link: Link,
        bytes_per_block: int,
        num_layers: int,
        overlap: bool = True,
    ) -> None:
        super().__init__(capacity_blocks, block_size, policy, clock, cost, n)
        self.shared = shared
        self.link = link
        self.set_loading(bytes_per_block, num_layers, overlap, n)
        self.local = [0] * n
        self.remote = [0] * n

    COLUMNS = PoolInstance.COLUMNS + ("local", "remote", "load")

    @property
    def hits_per_tier(self) -> dict[str, list]:
        return {"gpu": self.local, "global": self.remote}

    def start(self, i: int, hashes: list, full: int, anything_running: bool) -> bool:
        bp = self.bp
        local = len(bp.match_prefix(hashes))
        if not super().start(i, hashes, full, anything_running):
            return False
        g = self.shared.match(hashes)
        extra = len(g) - local if len(g) > local else 0
        if extra:
            self.shared.read(g[local:])
        self.local[i] = local
        self.remote[i] = extra
        self.hit[i] = local + extra
        self.load[i] = self.link.load_s(extra * self.bytes_per_block) if extra else 0.0
        return True

    def written(self, i: int, hashes: list) -> None:
        ids = self.held[i]
        if ids:
            self.bp.cache_blocks(ids, hashes, self.local[i])
        self.shared.put(hashes)
