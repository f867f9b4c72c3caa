"""Where a collector's records live: in memory in call order, and spilled to disk.

Accesses are kept as chunks in call order: sealed chunks (packed rows, or
:class:`~.batches.PromptSegment` of queued requests, made into rows when
read) followed by the open ``rows`` buffer that ``record_access`` appends to
without a lock. Evictions are four columns. With a spill store, everything in
memory moves to Parquet parts once over the bound, and reads put the spilled
records first (they are older).
"""

from __future__ import annotations

import threading
from array import array
from typing import Any

import numpy as np

from .batches import PromptSegment
from .spill import SpillStore

__all__ = ["RecordStore"]


class RecordStore:
    """Access chunks and eviction columns of one collector (thread-safe under ``lock``).

    Args:
        row_dtype: the packed record dtype.
        lock: the collector's lock (held by every method that changes state).
        spill: where records go once more than ``limit`` are in memory; None: unbounded.
        limit: the bound of records in memory (with ``spill``).
    """

    def __init__(
        self, row_dtype: np.dtype, lock: threading.Lock, spill: SpillStore | None, limit: int
    ) -> None:
        self.row_dtype = row_dtype
        self.lock = lock
        self.spill = spill
        self.limit = limit
        self.sealed: list[bytes | PromptSegment] = []
        self.sealed_rows = 0
        #: the open chunk: packed rows appended lock-free (one atomic C call each)
        self.rows = bytearray()
        self.ev_block = array("q")
        self.ev_ts = array("d")
        self.ev_reason: list[str] = []
        self.ev_hash: list[Any] = []

    def clear(self) -> None:
        """Forget every record (containers cleared in place) and the spilled parts."""
        with self.lock:
            del self.rows[:], self.sealed[:]
            self.sealed_rows = 0
            del self.ev_block[:], self.ev_ts[:], self.ev_reason[:], self.ev_hash[:]
            if self.spill is not None:
                self.spill.clear()

    @property
    def num_rows(self) -> int:
        spilled = self.spill.num_rows if self.spill is not None else 0
        return spilled + self.sealed_rows + len(self.rows) // self.row_dtype.itemsize

    @property
    def num_evictions(self) -> int:
        spilled = self.spill.num_evictions if self.spill is not None else 0
        return spilled + len(self.ev_block)

    @property
    def records_in_memory(self) -> int:
        return len(self.rows) // self.row_dtype.itemsize + self.sealed_rows + len(self.ev_block)

    def add_segment(self, segment: PromptSegment) -> None:
        """Append queued requests after every access recorded so far."""
        with self.lock:
            n = self._whole_rows()
            if n:  # rows recorded before the segment stay before it
                self.sealed.append(bytes(self.rows[:n]))
                self.sealed_rows += n // self.row_dtype.itemsize
                del self.rows[:n]
            self.sealed.append(segment)
            self.sealed_rows += segment.num_rows

    def add_evictions(self, codes: Any, ts: Any, reasons: list[str], hashes: list[Any]) -> None:
        """Append evictions given as columns (codes and seconds as int64 / float64 arrays)."""
        with self.lock:
            self.ev_block.frombytes(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
            self.ev_ts.frombytes(np.ascontiguousarray(ts, dtype=np.float64).tobytes())
            self.ev_reason.extend(reasons)
            self.ev_hash.extend(hashes)

    def add_eviction(self, code: int, ts: float, reason: str, block_hash: Any) -> None:
        with self.lock:
            self.ev_block.append(code)
            self.ev_ts.append(ts)
            self.ev_reason.append(reason)
            self.ev_hash.append(block_hash)

    def maybe_spill(self) -> None:
        """Move the in-memory records to the spill store once over the bound."""
        spill = self.spill
        if spill is None or self.records_in_memory <= self.limit:
            return
        with self.lock:
            raw = b"".join(self._take_chunks_locked())
            spill.write_evictions(self.ev_block, self.ev_ts, self.ev_reason, self.ev_hash)
            del self.ev_block[:], self.ev_ts[:], self.ev_reason[:], self.ev_hash[:]
            spill.write_rows(raw)

    def _whole_rows(self) -> int:
        """Bytes of whole records in the open buffer."""
        return len(self.rows) // self.row_dtype.itemsize * self.row_dtype.itemsize

    def _take_chunks_locked(self) -> list[bytes]:
        """Every in-memory access record as packed-row chunks, in order, leaving none."""
        dtype = self.row_dtype
        chunks = [c if isinstance(c, bytes) else c.rows(dtype).tobytes() for c in self.sealed]
        del self.sealed[:]
        self.sealed_rows = 0
        n = self._whole_rows()
        chunks.append(bytes(self.rows[:n]))
        del self.rows[:n]  # rows appended meanwhile (lock-free) land after n and stay
        return chunks

    def read(self) -> tuple[np.ndarray, tuple[Any, Any, list[str], list[Any]]]:
        """Every access record (a ``row_dtype`` array) and the eviction columns
        (codes, seconds, reasons, hashes), spilled ones first."""
        with self.lock:
            chunks = [*self.sealed, bytes(self.rows)]  # a copy: the buffer never stays exported
            ev_block = np.array(self.ev_block, dtype=np.int64)
            ev_ts = np.array(self.ev_ts, dtype=np.float64)
            ev_reason = list(self.ev_reason)
            ev_hash = list(self.ev_hash)
            spill = self.spill
            old = None
            if spill is not None and (spill.num_rows or spill.num_evictions):
                # read under the lock so a concurrent spill cannot move records
                # between the two reads
                old = (spill.read_rows(), *spill.read_evictions())
        dtype = self.row_dtype
        parts = [
            np.frombuffer(c, dtype=dtype) if isinstance(c, bytes) else c.rows(dtype) for c in chunks
        ]
        if old is not None:
            old_rows, old_block, old_ts, old_reason, old_hash = old
            parts.insert(0, old_rows)
            ev_block = np.concatenate([old_block, ev_block])
            ev_ts = np.concatenate([old_ts, ev_ts])
            ev_reason = old_reason + ev_reason
            ev_hash = old_hash + ev_hash
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return rows, (ev_block, ev_ts, ev_reason, ev_hash)
