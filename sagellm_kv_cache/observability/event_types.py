"""The three KV events a pool publishes (see ``events.KVEventStream``).

Each carries a sequence number (1, 2, 3, ... with no holes) and the pool's
timestamp::

    BlockStored(block_hashes, parent_block_hash, block_ids, block_size)
        blocks registered in the prefix cache, in chain order; the first
        block's parent is ``parent_block_hash`` (None: a request's first block)
    BlockRemoved(block_hashes, block_ids, reason)
        hashes dropped ("capacity", "explicit" or "clear")
    AllBlocksCleared()
        every hash dropped (pool reset)
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "KVEvent"]


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks registered under their hashes, in chain order."""

    seq: int
    timestamp: float
    block_hashes: tuple[Hashable, ...]
    parent_block_hash: Hashable | None
    block_ids: tuple[int, ...]
    block_size: int | None = None
    type: ClassVar[str] = "block_stored"


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Hashes dropped from the cache (their blocks may be reused at once)."""

    seq: int
    timestamp: float
    block_hashes: tuple[Hashable, ...]
    block_ids: tuple[int, ...]
    reason: str = "capacity"
    type: ClassVar[str] = "block_removed"


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every hash dropped (pool reset)."""

    seq: int
    timestamp: float
    type: ClassVar[str] = "all_blocks_cleared"


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
