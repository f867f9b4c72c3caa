"""What the parts of one ``KVTransferEngine`` share: its settings, backend,
registered pools, records and staging buffers."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import KVConfigError
from .backends.base import TransferBackend
from .digests import PieceDigests
from .plan import Staging
from .records import TransferBook

if TYPE_CHECKING:  # pragma: no cover
    from ..pool import KVPool

__all__ = ["Settings", "TransferContext"]


@dataclass(slots=True)
class Settings:
    """The engine's knobs (see ``KVTransferEngine`` for each)."""

    enable_checksum: bool
    checksum_algo: str
    max_retries: int
    retry_backoff_ms: float
    timeout_s: float
    compression: str
    chunk_bytes: int
    max_inflight: int
    max_workers: int
    direct_min_message_bytes: int
    direct_max_message_bytes: int | None  #: None: the backend's ``host_message_bytes``


@dataclass(slots=True)
class TransferContext:
    settings: Settings
    backend: TransferBackend
    book: TransferBook
    staging: Staging = field(default_factory=Staging)
    pools: dict[int, KVPool] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    digests: PieceDigests = field(default_factory=PieceDigests)

    def pool_for(self, rank: int) -> KVPool:
        with self.lock:
            pool = self.pools.get(rank)
        if pool is None:
            raise KVConfigError(f"no pool registered for rank {rank}")
        return pool

    def pool_or_none(self, rank: int) -> KVPool | None:
        with self.lock:
            return self.pools.get(rank)
