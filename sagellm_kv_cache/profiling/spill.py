"""Where an :class:`~sagellm_kv_cache.profiling.AccessStatsCollector` keeps the records
it moves out of memory: Parquet part files in a private folder.

A collector built with ``max_records_in_memory=N`` holds at most about ``N``
access and eviction records in memory (plus one batch being recorded); when it
holds more, it appends them here as one part file of each kind and frees them.
Every read (summary, tables, export) reads the parts back first, so results are
exactly those of an unbounded collector. The folder is created on the first
spill (under ``spill_dir``, default the system temp folder) and deleted with the
collector, on :meth:`SpillStore.clear` or at interpreter exit.

Part layouts (one row per record):

* accesses: the packed record's fields ``block``, ``timestamp``, ``request``,
  ``position``, ``size_bytes``, ``tier``, ``is_hit`` (codes into the collector's
  interned keys, which stay in memory);
* evictions: ``block`` (code), ``timestamp``, ``reason``, and the block hash as
  ``hash_bytes`` (binary) or ``hash_int`` (decimal text, any size), null otherwise.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SpillStore"]


class SpillStore:
    """Append-only Parquet parts of access rows and evictions (see the module doc).

    Args:
        row_dtype: the collector's packed record dtype (its fields are the columns).
        directory: where the private folder goes; None: the system temp folder.
    """

    def __init__(self, row_dtype: np.dtype, directory: str | Path | None = None) -> None:
        self._dtype = row_dtype
        self._fields: tuple[str, ...] = row_dtype.names or ()
        self._parent = None if directory is None else str(directory)
        self._dir: Path | None = None
        self._finalizer: Any = None
        self._row_parts: list[Path] = []
        self._ev_parts: list[Path] = []
        self.num_rows = 0
        self.num_evictions = 0

    def _folder(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="sagellm-kv-stats-", dir=self._parent))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        return self._dir

    def write_rows(self, raw: bytes) -> None:
        """Append packed records (``raw``: whole records of ``row_dtype``)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = np.frombuffer(raw, dtype=self._dtype)
        if not len(rows):
            return
        table = pa.table({name: rows[name].copy() for name in self._fields})
        path = self._folder() / f"rows-{len(self._row_parts):06d}.parquet"
        pq.write_table(table, path)
        self._row_parts.append(path)
        self.num_rows += len(rows)

    def write_evictions(self, block: Any, ts: Any, reason: list, hashes: list) -> None:
        """Append evictions given as columns (codes, seconds, reasons, hashes)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not len(block):
            return
        table = pa.table(
            {
                "block": pa.array(np.asarray(block, dtype=np.int64)),
                "timestamp": pa.array(np.asarray(ts, dtype=np.float64)),
                "reason": pa.array(reason, type=pa.string()),
                "hash_bytes": pa.array(
                    [h if isinstance(h, bytes) else None for h in hashes], type=pa.binary()
                ),
                "hash_int": pa.array(
                    [
                        str(int(h)) if isinstance(h, int) and not isinstance(h, bool) else None
                        for h in hashes
                    ],
                    type=pa.string(),
                ),
            }
        )
        path = self._folder() / f"evictions-{len(self._ev_parts):06d}.parquet"
        pq.write_table(table, path)
        self._ev_parts.append(path)
        self.num_evictions += len(block)

    def read_rows(self) -> np.ndarray:
        """Every spilled access record, in order, as a ``row_dtype`` array."""
        import pyarrow.parquet as pq

        out = np.empty(self.num_rows, dtype=self._dtype)
        at = 0
        for path in self._row_parts:
            table = pq.read_table(path)
            n = table.num_rows
            for name in self._fields:
                out[name][at : at + n] = table.column(name).to_numpy()
            at += n
        return out

    def read_evictions(self) -> tuple[np.ndarray, np.ndarray, list, list]:
        """Every spilled eviction, in order: ``(codes, seconds, reasons, hashes)``."""
        import pyarrow.parquet as pq

        blocks, stamps, reasons, hashes = [], [], [], []
        for path in self._ev_parts:
            t = pq.read_table(path)
            blocks.append(t.column("block").to_numpy())
            stamps.append(t.column("timestamp").to_numpy())
            reasons += t.column("reason").to_pylist()
            hashes += [
                b if b is not None else (None if i is None else int(i))
                for b, i in zip(
                    t.column("hash_bytes").to_pylist(), t.column("hash_int").to_pylist()
                )
            ]
        block = np.concatenate(blocks) if blocks else np.empty(0, dtype=np.int64)
        ts = np.concatenate(stamps) if stamps else np.empty(0, dtype=np.float64)
        return block.astype(np.int64), ts.astype(np.float64), reasons, hashes

    def clear(self) -> None:
        """Forget every part and delete the folder."""
        if self._finalizer is not None:
            self._finalizer()
        self._dir = None
        self._finalizer = None
        self._row_parts.clear()
        self._ev_parts.clear()
        self.num_rows = 0
        self.num_evictions = 0

    @property
    def directory(self) -> Path | None:
        """The private folder (None before the first spill)."""
        return self._dir
