"""Block hashes as columns: flat int64 values plus int64 offsets, never lists of lists.

A trace's ``block_hashes`` column is an Arrow ``LargeList(Int64)``: one flat
buffer of every id in trace order and ``n + 1`` offsets, request ``i`` owning
``values[offsets[i]:offsets[i + 1]]``::

    offsets  0     3   4        7
    values   h0 h1 h2 | g0 | f0 f1 f2

Memory per block: 8 bytes (its id in ``values``); per request 8 more (its
offset) plus the scalar columns. :func:`hash_arrays` hands the two buffers to
numpy without copying the values of a single-chunk column; :func:`list_series`
builds the column from them without a per-id Python object (the buffers are
wrapped, not converted, so ``pa.array``'s pandas import never happens).

:class:`FlatHashes` is the sequence view replay loops index (``col[i]`` is
request ``i``'s ids as a list, made on demand); :class:`StreamedHashes` is the
same view over a stream of batches, holding one batch at a time, for
replays that visit requests in order.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Any

import numpy as np

__all__ = [
    "FlatHashes",
    "StreamedHashes",
    "flat_from_lists",
    "hash_arrays",
    "hash_view",
    "is_int_list",
    "list_series",
]

#: Bytes a block costs in a canonical table's ``block_hashes`` column.
BYTES_PER_BLOCK = 8
#: Bytes a request costs there (its offset), beside its scalar columns.
BYTES_PER_REQUEST_OFFSET = 8


def hash_arrays(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(values, offsets)`` of a ``List(Int64)`` column (a polars Series or a table).

    ``values`` is int64, every id in trace order; ``offsets`` int64 of length
    ``n + 1``. A single-chunk column gives its values buffer without a copy;
    ids that are not integers (str, bytes) come as dense int64 codes (equal ids,
    equal codes), which is all a stack-distance pass or a sampler needs.
    """
    s = column["block_hashes"] if hasattr(column, "columns") else column
    n = len(s)
    offsets = np.zeros(n + 1, dtype=np.int64)
    if not n:
        return np.zeros(0, dtype=np.int64), offsets
    np.cumsum(s.list.len().to_numpy(), out=offsets[1:])
    flat = s.explode(empty_as_null=False)
    if not is_int_list(s):  # str or bytes ids: equal ids get equal int64 codes
        return flat.rank("dense").to_numpy().astype(np.int64), offsets
    values = flat.to_numpy()
    if values.dtype != np.int64:
        values = values.astype(np.int64)
    return values, offsets


def is_int_list(column: Any) -> bool:
    """Whether a ``List`` column holds integer ids (the canonical ``List(Int64)``)."""
    inner = getattr(column.dtype, "inner", None)
    return inner is not None and inner.is_integer()


def hash_view(table: Any) -> Any:
    """Request ``i``'s ids at ``[i]``: a :class:`FlatHashes` over an integer column, the
    per-request lists of any other (str or bytes ids keep their values)."""
    col = table["block_hashes"]
    return FlatHashes.of(col) if is_int_list(col) else col.to_list()


def list_series(values: np.ndarray, offsets: np.ndarray, name: str = "block_hashes") -> Any:
    """A polars ``List(Int64)`` Series over flat ``values`` and ``offsets`` (no per-id objects)."""
    import polars as pl
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.int64)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    flat = pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])
    n = len(offsets) - 1
    arr = pa.LargeListArray.from_buffers(
        pa.large_list(pa.int64()), n, [None, pa.py_buffer(offsets)], children=[flat]
    )
    return pl.Series(name, arr, dtype=pl.List(pl.Int64))


def flat_from_lists(lists: Iterable[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(values, offsets)`` of a batch of per-request id lists (one flat copy)."""
    lists = lists if isinstance(lists, list | tuple) else list(lists)
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = array("q", chain.from_iterable(lists))
    values = np.frombuffer(flat, dtype=np.int64) if len(flat) else np.zeros(0, np.int64)
    return values, offsets


class FlatHashes:
    """Request ``i``'s ids as a list, from flat ``values`` and ``offsets`` (made on demand).

    Reads convert a window of ``values`` (at least ``WINDOW`` ids, from the request
    asked for on) to Python ints at once and slice requests out of it: a replay
    reads requests in order, so each id is converted once, at a fraction of a
    per-request ``tolist`` call, with one window held.
    """

    __slots__ = ("_hi", "_lo", "_offs", "_win", "offsets", "values")

    #: ids converted per window (about 40 MB of Python ints)
    WINDOW = 1 << 20

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values = values
        self.offsets = offsets
        self._offs: list[int] | None = None
        self._win: list[int] = []
        self._lo = self._hi = 0

    @classmethod
    def of(cls, column: Any) -> FlatHashes:
        return cls(*hash_arrays(column))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.head(i, None)

    def head(self, i: int, n: int | None) -> list[int]:
        """Request ``i``'s first ``n >= 0`` ids (all of them for None): ``self[i][:n]``
        without the second list."""
        offs = self._offs
        if offs is None:
            offs = self._offs = self.offsets.tolist()
        a = offs[i]
        b = offs[i + 1]
        if n is not None and a + n < b:
            b = a + n
        lo = self._lo
        if a < lo or b > self._hi:
            lo = self._lo = a
            self._hi = max(b, a + self.WINDOW)
            self._win = self.values[lo : self._hi].tolist()
        return self._win[a - lo : b - lo]


class StreamedHashes:
    """:class:`FlatHashes` over a stream of ``block_hashes`` batches, one batch held.

    Indexing must not go back past the batch held (a sequential replay reads
    request ``i`` only after ``i - 1``); ``len`` is the total request count,
    given up front.
    """

    __slots__ = ("_base", "_batches", "_cur", "_n")

    def __init__(self, batches: Iterator[Any], num_requests: int) -> None:
        self._batches = iter(batches)
        self._n = num_requests
        self._base = 0
        self._cur = FlatHashes(np.zeros(0, np.int64), np.zeros(1, np.int64))

    def __len__(self) -> int:
        return self._n

    def _batch(self, i: int) -> tuple[FlatHashes, int]:
        """The batch holding request ``i`` (read on from the stream) and ``i`` in it."""
        cur = self._cur
        while i >= self._base + len(cur):
            self._base += len(cur)
            cur = self._cur = FlatHashes.of(next(self._batches))
        if i < self._base:
            raise IndexError(f"request {i} is before the batch held (from {self._base})")
        return cur, i - self._base

    def __getitem__(self, i: int) -> list[int]:
        cur, j = self._batch(i)
        return cur.head(j, None)

    def head(self, i: int, n: int | None) -> list[int]:
        """Request ``i``'s first ``n >= 0`` ids: ``self[i][:n]`` without the second list."""
        cur, j = self._batch(i)
        return cur.head(j, n)
