"""Records of transfers: one ``TransferRecord`` per transfer and side, kept in a
``TransferBook`` (the engine's history, totals and the seed's counters).

A transfer is PENDING/RUNNING until it ends COMPLETED or FAILED; its record
stays until ``clear_completed`` drops the completed ones. Unknown ids raise
``KVInvalidInputError``.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..errors import KVInvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    from ..handle import KVHandle
    from .wire import TransferHeader

__all__ = ["ReceivedTransfer", "TransferBook", "TransferRecord", "TransferStatus"]


class TransferStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(slots=True)
class TransferRecord:
    """Metadata and metrics of one transfer (one side's view)."""

    transfer_id: int
    src_rank: int
    dst_rank: int
    role: str  # "sender", "receiver" or "local"
    status: TransferStatus = TransferStatus.PENDING
    num_segments: int = 0
    num_blocks: int = 0
    num_tokens: int = 0
    payload_nbytes: int = 0
    wire_nbytes: int = 0
    duration_s: float = 0.0
    retries: int = 0
    checksum_algo: str = "none"
    compression: str = "none"
    error_code: str | None = None
    error: str | None = None
    dst_handle_ids: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    @property
    def gbps(self) -> float:
        """Payload gigabytes (1e9 bytes) per second of the whole transfer."""
        return self.payload_nbytes / self.duration_s / 1e9 if self.duration_s > 0 else 0.0

    def fill(self, h: TransferHeader) -> None:
        """Sizes and codecs from the transfer's header."""
        self.num_segments = len(h.segments)
        self.num_blocks = h.num_blocks
        self.num_tokens = h.num_tokens
        self.payload_nbytes = h.payload_nbytes
        self.wire_nbytes = h.wire_nbytes
        self.checksum_algo = h.checksum_algo
        self.compression = h.compression

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain value (``status`` by its value, a copy of
        ``dst_handle_ids``), with ``gbps`` after ``duration_s``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            out[f.name] = getattr(self, f.name)
            if f.name == "duration_s":
                out["gbps"] = self.gbps
        out["status"] = self.status.value
        out["dst_handle_ids"] = list(self.dst_handle_ids)
        return out


@dataclass(slots=True)
class ReceivedTransfer:
    """What ``receive()`` returns: the record and the receiver's handles (one per segment)."""

    record: TransferRecord
    handles: list[KVHandle]

    @property
    def handle(self) -> KVHandle:
        """The only handle of a single-handle transfer."""
        if len(self.handles) != 1:
            raise KVInvalidInputError(f"transfer has {len(self.handles)} handles; use .handles")
        return self.handles[0]

    @property
    def transfer_id(self) -> int:
        return self.record.transfer_id


class TransferBook:
    """The records of one engine (both roles) and its running totals; thread-safe."""

    def __init__(self, checksum_algo: str, compression: str) -> None:
        self.checksum_algo = checksum_algo
        self.compression = compression
        self._records: dict[int, TransferRecord] = {}
        self._lock = threading.Lock()
        self._totals: dict[str, Any] = {
            "completed": 0,
            "failed": 0,
            "bytes": 0,
            "seconds": 0.0,
            "retries": 0,
        }

    def open(self, src: int, dst: int, role: str, tid: int) -> TransferRecord:
        """A RUNNING record for transfer ``tid``."""
        rec = TransferRecord(
            transfer_id=tid,
            src_rank=src,
            dst_rank=dst,
            role=role,
            status=TransferStatus.RUNNING,
            checksum_algo=self.checksum_algo,
            compression=self.compression,
        )
        with self._lock:
            self._records[tid] = rec
        return rec

    def finish(self, rec: TransferRecord, t0: float, exc: BaseException | None) -> None:
        """Close ``rec`` (started at ``perf_counter`` ``t0``) as completed or failed."""
        rec.duration_s = time.perf_counter() - t0
        with self._lock:
            if exc is None:
                rec.status = TransferStatus.COMPLETED
                self._totals["completed"] += 1
                self._totals["bytes"] += rec.payload_nbytes
                self._totals["seconds"] += rec.duration_s
            else:
                rec.status = TransferStatus.FAILED
                rec.error_code = getattr(exc, "code", type(exc).__name__)
                rec.error = str(exc)
                self._totals["failed"] += 1
            self._totals["retries"] += rec.retries

    def get(self, transfer_id: int) -> TransferRecord:
        with self._lock:
            try:
                return self._records[transfer_id]
            except KeyError:
                raise KVInvalidInputError(f"unknown transfer id {transfer_id}") from None

    def ids(self) -> list[int]:
        """Ids of the transfers on record, ascending."""
        with self._lock:
            return sorted(self._records)

    def count(self, *statuses: str) -> int:
        with self._lock:
            return sum(1 for r in self._records.values() if r.status.value in statuses)

    def clear_completed(self) -> int:
        """Forget the completed records; returns how many went."""
        with self._lock:
            done = [t for t, r in self._records.items() if r.status is TransferStatus.COMPLETED]
            for t in done:
                del self._records[t]
        return len(done)

    def totals(self) -> dict[str, Any]:
        with self._lock:
            t = dict(self._totals)
        t["gbps"] = t["bytes"] / t["seconds"] / 1e9 if t["seconds"] else 0.0
        return t
