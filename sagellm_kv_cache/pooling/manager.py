"""``GlobalKVPoolManager`` and ``NodeContribution`` (seed API): several nodes'
pools as one global KV pool.

::

    GlobalKVPoolManager
      nodes: rank -> NodeContribution(pool, contributed_blocks)
      directory: block hash -> ranks holding it cached   (DirectoryHook on each pool)
      accessor:  RemoteKVAccessor over a KVTransferEngine (prefix fetches between nodes)

Allocation rule (``alloc``): the preferred node when the allocation fits there
(within its contribution and the pool's admission rule), else the node with
the most room, ``min(contributed - held, obtainable)`` blocks, ties to the lowest
rank; none fits: ``KVBudgetExceededError`` and nothing changes.

Rebalance rule (``rebalance``): a node's occupancy is the share of its pool in
use or cached. While the fullest and the emptiest node differ by more than
``tolerance``, the least recently cached whole chain of unreferenced cached
blocks on the fullest node that the emptiest lacks is copied there through
the engine, then dropped on the source; it stops when no such chain is left
or ``max_blocks`` moved. Blocks in use never move.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import (
    KVBudgetExceededError,
    KVConfigError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVInvalidTypeError,
)
from ..handle import KVHandle
from ..transfer._args import check_pool, check_rank
from .directory import BlockDirectory, DirectoryHook
from .remote import RemoteKVAccessor

if TYPE_CHECKING:  # pragma: no cover
    from ..pool import KVPool
    from ..transfer import KVTransferEngine

__all__ = ["GlobalKVPoolManager", "NodeContribution"]

_GIB = float(1 << 30)


@dataclass
class NodeContribution:
    """What one node gives the global pool.

    Attributes:
        node_rank: the node's global rank.
        pool: its ``KVPool`` when the node lives in this process (None: remote).
        contributed_blocks: blocks of ``pool`` the global pool may hold (default:
            from ``contributed_memory_gb`` when given, else the whole pool).
        total_memory_gb / contributed_memory_gb / reserved_memory_gb /
        storage_tiers: the seed's fields (GiB); contributed + reserved <= total.
    """

    node_rank: int
    pool: KVPool | None = None
    contributed_blocks: int | None = None
    total_memory_gb: float = 0.0
    contributed_memory_gb: float = 0.0
    reserved_memory_gb: float = 0.0
    storage_tiers: list[str] = field(default_factory=lambda: ["gpu"])

    def __post_init__(self) -> None:
        check_rank("node_rank", self.node_rank)
        for name in ("total_memory_gb", "contributed_memory_gb", "reserved_memory_gb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0 or v != v:
                raise KVConfigError(f"{name} must be a number >= 0, got {v!r}")
        if self.total_memory_gb and (
            self.contributed_memory_gb + self.reserved_memory_gb > self.total_memory_gb
        ):
            raise KVConfigError(
                f"Contributed ({self.contributed_memory_gb}GB) + Reserved "
                f"({self.reserved_memory_gb}GB) > Total ({self.total_memory_gb}GB)"
            )
        if not isinstance(self.storage_tiers, list) or not all(
            isinstance(t, str) for t in self.storage_tiers
        ):
            raise KVInvalidTypeError("storage_tiers must be a list of str")
        if self.pool is not None:
            check_pool(self.pool)
        c = self.contributed_blocks
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise KVConfigError(f"contributed_blocks must be an int >= 0, got {c!r}")
        if self.pool is None:
            return
        if c is None:
            c = self.pool.num_blocks
            shape = self.pool.model_shape
            if self.contributed_memory_gb and shape is not None:
                per_block = shape.bytes_per_block(self.pool.block_size)
                c = int(self.contributed_memory_gb * _GIB // per_block)
        self.contributed_blocks = min(c, self.pool.num_blocks)


class GlobalKVPoolManager:
    """Several nodes' pools as one global KV pool (see the module doc for the rules).

    Args:
        nodes: one ``NodeContribution`` per node, distinct ranks, one block size.
        engine: a ``KVTransferEngine`` for moving blocks between nodes; with an
            in-process one every local pool is registered at its rank. Without
            one, an in-process engine is made when two nodes here hold KV.
        timeout_s: bound on each wait of a remote fetch.
    """

    def __init__(
        self,
        nodes: Sequence[NodeContribution],
        *,
        engine: KVTransferEngine | None = None,
        timeout_s: float | None = None,
    ) -> None:
        if not isinstance(nodes, list | tuple) or not nodes:
            raise KVInvalidInputError("nodes must be a non-empty list of NodeContribution")
        ranks: set[int] = set()
        pools: set[int] = set()
        for n in nodes:
            if not isinstance(n, NodeContribution):
                raise KVInvalidTypeError(f"expected a NodeContribution, got {type(n).__name__}")
            if n.node_rank in ranks:
                raise KVConfigError(f"node rank {n.node_rank} given twice")
            ranks.add(n.node_rank)
            if n.pool is not None:
                if id(n.pool) in pools:
                    raise KVConfigError("one pool contributed by two nodes")
                pools.add(id(n.pool))
        local = [n for n in nodes if n.pool is not None]
        if len({n.pool.block_size for n in local}) > 1:
            raise KVConfigError("all nodes' pools need one block size")
        self._nodes = {n.node_rank: n for n in sorted(nodes, key=lambda n: n.node_rank)}
        self.directory = BlockDirectory()
        self._held: dict[int, int] = {r: 0 for r in self._nodes}
        self._handles: dict[str, int] = {}
        self._lock = threading.RLock()
        if engine is None and sum(n.pool.storage is not None for n in local) >= 2:
            from ..transfer import KVTransferEngine

            engine = KVTransferEngine("inprocess")
        self.engine = engine
        kv_pools = {n.node_rank: n.pool for n in local if n.pool.storage is not None}
        self.accessor: RemoteKVAccessor | None = None
        if engine is not None and kv_pools:
            self.accessor = RemoteKVAccessor(
                engine, kv_pools, directory=self.directory, timeout_s=timeout_s
            )
        self._hooks: list[tuple[KVPool, DirectoryHook]] = []
        for n in local:
            hook = DirectoryHook(self.directory, n.node_rank)
            n.pool.add_hook(hook)
            hook.sync(n.pool)
            self._hooks.append((n.pool, hook))

    # -- nodes -------------------------------------------------------------------
    @property
    def node_ranks(self) -> list[int]:
        return list(self._nodes)

    def contribution(self, node_rank: int) -> NodeContribution:
        return self._node(node_rank)

    def _node(self, rank: Any) -> NodeContribution:
        check_rank("node_rank", rank)
        n = self._nodes.get(rank)
        if n is None:
            raise KVInvalidInputError(f"no node of rank {rank} in this global pool")
        return n

    def _local_pool(self, rank: Any) -> KVPool:
        pool = self._node(rank).pool
        if pool is None:
            raise KVConfigError(f"node {rank}'s pool is not in this process")
        return pool

    def _room(self, rank: int, n_blocks: int) -> int:
        """Blocks node ``rank`` could give the global pool now (-1: not here)."""
        node = self._nodes[rank]
        if node.pool is None or node.pool.peek_admission(n_blocks) is not None:
            return -1
        return min(node.contributed_blocks - self._held[rank], node.pool.obtainable_blocks())

    def locate(self, block_hashes: Sequence[Hashable]) -> tuple[int | None, int]:
        """``(rank, num_blocks)`` of the node caching the longest leading run."""
        return self.directory.longest_prefix(block_hashes)

    # -- allocation ----------------------------------------------------------------
    def alloc(
        self,
        num_tokens: int,
        dtype: Any = None,
        layout: Any = None,
        device: Any = None,
        preferred_node: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> KVHandle:
        """Allocate ``num_tokens`` on some node (rule: module doc). The handle's
        ``node_rank`` names the node.

        Raises:
            KVInvalidTypeError / KVInvalidInputError / KVConfigError: bad arguments.
            KVBudgetExceededError: no node has room; nothing changed.
        """
        from ..pool import check_num_tokens

        num_tokens = check_num_tokens(num_tokens)
        if preferred_node is not None:
            self._node(preferred_node)
        if metadata is not None and not isinstance(metadata, dict):
            raise KVInvalidTypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        with self._lock:
            bs = next((n.pool.block_size for n in self._nodes.values() if n.pool), None)
            if bs is None:
                raise KVConfigError("no node's pool is in this process")
            need = -(-num_tokens // bs)
            rank = None
            if preferred_node is not None and self._room(preferred_node, need) >= need:
                rank = preferred_node
            else:
                rooms = [(self._room(r, need), -r) for r in self._nodes]
                room, neg = max(rooms)
                if room >= need:
                    rank = -neg
            if rank is None:
                raise KVBudgetExceededError(
                    f"no node has room for {need} blocks within its contribution", needed=need
                )
            meta = dict(metadata or {})
            meta["node_rank"] = rank
            h = self._nodes[rank].pool.alloc(num_tokens, device, dtype, layout, metadata=meta)
            self._held[rank] += h.num_blocks
            self._handles[h.handle_id] = rank
            return h

    def alloc_with_prefix(
        self,
        tokens: Any = None,
        *,
        node_rank: int,
        block_hashes: Sequence[Hashable] | None = None,
        num_tokens: int | None = None,
        fetch_remote: bool = True,
        request_id: str | None = None,
    ) -> tuple[KVHandle, int]:
        """A request on ``node_rank``: when another node caches a longer prefix
        (directory), fetch it first (``RemoteKVAccessor``), then allocate on
        ``node_rank`` with prefix reuse. Returns ``(handle, num_hit_tokens)``;
        ``handle.metadata["remote_hit_tokens"]`` says how many came from afar.
        A stale directory entry is a miss; a failed transfer raises its typed
        error with ``node_rank``'s pool unchanged."""
        pool = self._local_pool(node_rank)
        if tokens is not None:
            if block_hashes is not None:
                raise KVInvalidInputError("give tokens or block_hashes, not both")
            block_hashes = pool.compute_block_hashes(tokens)
            if num_tokens is None:
                num_tokens = len(tokens)
        fetched = 0
        if fetch_remote and self.accessor is not None and block_hashes:
            res = self.accessor.fetch(list(block_hashes), node_rank)
            fetched = res.num_blocks - res.local_blocks if res.hit else 0
        if tokens is not None:
            h, hit = pool.alloc_with_prefix(tokens, request_id=request_id)
        else:
            h, hit = pool.alloc_with_prefix(
                block_hashes=block_hashes, num_tokens=num_tokens, request_id=request_id
            )
        h.metadata["node_rank"] = node_rank
        h.metadata["remote_hit_tokens"] = min(fetched * pool.block_size, hit)
        with self._lock:
            self._held[node_rank] += h.num_blocks
            self._handles[h.handle_id] = node_rank
        return h, hit

    def free(self, handle: KVHandle) -> None:
        """Release a handle this manager issued (on whichever node holds it)."""
        if not isinstance(handle, KVHandle):
            raise KVInvalidTypeError(f"expected a KVHandle, got {type(handle).__name__}")
        with self._lock:
            rank = self._handles.get(handle.handle_id)
            if rank is None:
                raise KVInvalidHandleError(f"handle {handle.handle_id} is not this global pool's")
            self._nodes[rank].pool.free(handle)  # validates (double free, pinned) first
            del self._handles[handle.handle_id]
            self._held[rank] -= handle.num_blocks

    def get(self, handle: KVHandle, current_rank: int | None = None):
        """The handle's KV (``[L, 2, num_tokens, ...]``), read from the node holding
        it; nodes of this process share memory, so no transfer is needed (prefixes
        cached elsewhere come through ``alloc_with_prefix`` / ``accessor.fetch``)."""
        if not isinstance(handle, KVHandle):
            raise KVInvalidTypeError(f"expected a KVHandle, got {type(handle).__name__}")
        if current_rank is not None:
            self._node(current_rank)
        with self._lock:
            rank = self._handles.get(handle.handle_id)
        if rank is None:
            raise KVInvalidHandleError(f"handle {handle.handle_id} is not this global pool's")
        return self._nodes[rank].pool.read_kv(handle)

    # -- balance and stats -------------------------------------------------------------
    def _occupancy(self, rank: int) -> float:
        bp = self._nodes[rank].pool.block_pool
        return (bp.num_used + bp.num_evictable) / bp.num_blocks

    def rebalance(self, *, tolerance: float = 0.25, max_blocks: int | None = None) -> list[dict]:
        """Move cached chains from the fullest node to the emptiest (rule: module doc).
        Returns the moves, ``{"src", "dst", "num_blocks"}`` each, in order."""
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, int | float)
            or not (0 <= tolerance <= 1)
        ):
            raise KVConfigError(f"tolerance must be a number in [0, 1], got {tolerance!r}")
        if max_blocks is not None and (
            isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 0
        ):
            raise KVInvalidInputError(f"max_blocks must be an int >= 0, got {max_blocks!r}")
        if self.accessor is None or self.accessor.distributed:
            return []
        ranks = sorted(self.accessor.pools)
        moves: list[dict] = []
        moved = 0
        tried: set[tuple[int, Hashable]] = set()
        while len(ranks) >= 2 and (max_blocks is None or moved < max_blocks):
            occ = {r: self._occupancy(r) for r in ranks}
            src = max(ranks, key=lambda r: (occ[r], -r))
            dst = min(ranks, key=lambda r: (occ[r], r))
            if occ[src] - occ[dst] <= tolerance:
                break
            chain = self._movable_chain(self.accessor.pools, src, dst, tried)
            if chain is None:
                break
            if max_blocks is not None:
                chain = chain[: max_blocks - moved]
            dst_pool = self.accessor.pools[dst]
            if dst_pool.peek_admission(len(chain)) is not None:
                break
            res = self.accessor.fetch(chain, dst, src_rank=src)
            if not res.hit:
                break
            src_pool = self.accessor.pools[src]
            src_pool.invalidate(chain[res.local_blocks : res.num_blocks])
            moved += res.num_blocks - res.local_blocks
            moves.append({"src": src, "dst": dst, "num_blocks": res.num_blocks - res.local_blocks})
        return moves

    @staticmethod
    def _movable_chain(pools: dict, src: int, dst: int, tried: set) -> list | None:
        """Hashes of one root-to-leaf chain of unreferenced cached blocks on ``src``
        whose leaf ``dst`` lacks, the least recently cached leaf first."""
        pool = pools[src]
        dst_pool = pools[dst]
        with pool.lock:
            bp = pool.block_pool
            hashes, parents, refs = bp.block_hashes, bp.parent_ids, bp.ref_counts
            cached = list(bp.cached.values())  # insertion order: oldest first
            is_parent = {parents[b] for b in cached}
            for leaf in cached:
                if leaf in is_parent or refs[leaf] or bp.pin_counts[leaf]:
                    continue
                chain, b = [], leaf
                while b >= 0 and hashes[b] is not None and not refs[b]:
                    chain.append(hashes[b])
                    b = parents[b]
                if b >= 0 or (src, chain[0]) in tried:
                    continue  # a parent in use, or moved before: leave it
                tried.add((src, chain[0]))
                chain.reverse()
                if chain[-1] not in dst_pool.block_pool.cached:
                    return chain
        return None

    def get_global_stats(self) -> dict[str, Any]:
        """Capacity and use over the nodes of this process, per node, and the directory."""
        per_node: dict[int, dict[str, Any]] = {}
        total = allocated = 0
        with self._lock:
            for rank, n in self._nodes.items():
                row: dict[str, Any] = {"local": n.pool is not None,
                                       "directory_blocks": self.directory.num_blocks(rank)}  # fmt: skip
                if n.pool is not None:
                    s = n.pool.get_stats()
                    bs = n.pool.block_size
                    row.update(
                        capacity_tokens=n.pool.max_tokens,
                        contributed_tokens=n.contributed_blocks * bs,
                        global_held_tokens=self._held[rank] * bs,
                        allocated_tokens=s["used_blocks"] * bs,
                        cached_blocks=s["cached_blocks"],
                        free_blocks=s["free_blocks"],
                        occupancy=self._occupancy(rank),
                    )
                    total += row["contributed_tokens"]
                    allocated += row["global_held_tokens"]
                per_node[rank] = row
            return {
                "num_nodes": len(self._nodes),
                "total_capacity_tokens": total,
                "allocated_tokens": allocated,
                "available_tokens": total - allocated,
                "utilization": allocated / total if total else 0.0,
                "num_handles": len(self._handles),
                "directory_blocks": len(self.directory),
                "remote": self.accessor.get_stats() if self.accessor is not None else {},
                "per_node_stats": per_node,
            }

    def close(self) -> None:
        """Detach the directory hooks and stop the accessor's workers."""
        for pool, hook in self._hooks:
            if any(h is hook for h in pool.hooks):
                pool.remove_hook(hook)
        self._hooks = []
        if self.accessor is not None:
            self.accessor.close()
