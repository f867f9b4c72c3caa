"""``AccessStatsHook``: feeds pool / prefix-cache events into a collector.

Attach it with ``pool.add_hook(AccessStatsHook(collector))``. One lookup of
a request with ``num_blocks`` prompt blocks becomes ``num_blocks`` accesses::

    position   0    1    2    3    4
    block_ids  7    3    12   40   41      num_hit_blocks = 3
    is_hit     hit  hit  hit  miss miss    (misses: the blocks newly allocated)
"""

from __future__ import annotations

from ..errors import KVInvalidInputError
from ..hooks import PoolHook
from .collector import AccessStatsCollector

__all__ = ["DEFAULT_MAX_RECORDS_IN_MEMORY", "AccessStatsHook"]

#: Records (accesses + evictions) the collector a hook creates keeps in memory
#: before moving them to Parquet parts on disk (about 45 MB of records).
DEFAULT_MAX_RECORDS_IN_MEMORY = 1 << 20


class AccessStatsHook(PoolHook):
    """Pool hook that records every looked-up block and every eviction.

    Memory stays bounded however long the pool runs: the collector it creates
    holds at most ``max_records_in_memory`` records (default
    :data:`DEFAULT_MAX_RECORDS_IN_MEMORY`) and spills older ones to Parquet
    parts under ``spill_dir``; summaries still count every record (see
    :class:`AccessStatsCollector`). A collector passed in keeps its own setting.

    Args:
        collector: where to record; a new :class:`AccessStatsCollector` if omitted.
        tier: tier name stored with every access (e.g. ``"gpu"``), or None.
        block_size_bytes: size stored with every access, or None.
        max_records_in_memory: bound of the created collector (None: unbounded).
        spill_dir: where the created collector spills; default the system temp folder.
    """

    __slots__ = ("_collector", "_push", "block_size_bytes", "tier")

    def __init__(
        self,
        collector: AccessStatsCollector | None = None,
        *,
        tier: str | None = None,
        block_size_bytes: int | None = None,
        max_records_in_memory: int | None = DEFAULT_MAX_RECORDS_IN_MEMORY,
        spill_dir: str | None = None,
    ) -> None:
        if collector is None:
            collector = AccessStatsCollector(
                max_records_in_memory=max_records_in_memory, spill_dir=spill_dir
            )
        self._collector = collector
        # the hot path pushes onto the collector's queue itself: one Python frame
        # less per pool event, which costs more than its size on the pool's hot path
        # (the hook's code and objects are out of cache between two pool events)
        self._push = collector._pending.push
        self.tier = tier
        self.block_size_bytes = block_size_bytes

    @property
    def collector(self) -> AccessStatsCollector:
        """Where this hook records (fixed at construction)."""
        return self._collector

    def on_lookup(self, request_id, block_ids, num_hit_blocks, num_blocks, timestamp) -> None:
        """Record ``block_ids[:num_hit_blocks]`` as hits and the rest as misses, positions 0.."""
        n = len(block_ids)
        if num_blocks and num_blocks < n:
            n = num_blocks
            block_ids = block_ids[:n]
        if not 0 <= num_hit_blocks <= n:
            raise KVInvalidInputError(f"num_hit_blocks must be in [0, {n}], got {num_hit_blocks}")
        # straight to the queue: the pool's ids and times need none of record_prompt's checks
        if n and self._push(
            block_ids,
            num_hit_blocks,
            float(timestamp),
            request_id,
            self.tier,
            self.block_size_bytes,
        ):
            self._collector._flush()  # the queue asks for a flush when it is full

    def on_evict_many(self, block_ids, block_hashes, reason, timestamp) -> None:
        """Record the eviction of ``block_ids`` (one queued batch; hashes that are not
        bytes / int are stored as None)."""
        if len(block_hashes) != len(block_ids):
            raise KVInvalidInputError(
                f"block_hashes has {len(block_hashes)} entries for {len(block_ids)} block ids"
            )
        # hits -1 marks an eviction batch; its reason goes where a prompt's request id goes
        if len(block_ids) and self._push(
            block_ids, -1, float(timestamp), str(reason), None, None, block_hashes
        ):
            self._collector._flush()

    def on_evict(self, block_id, block_hash, reason, timestamp) -> None:
        """Record the eviction of ``block_id``."""
        h = block_hash if isinstance(block_hash, (bytes, int)) else None
        self.collector.record_eviction(block_id, reason, timestamp=float(timestamp), block_hash=h)
