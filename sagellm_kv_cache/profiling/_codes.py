"""Vectorised helpers of ``AccessStatsCollector``'s queue flush.

A pool hook queues one request's block ids per lookup and one batch per
eviction; the collector turns the queue into records in one step. Two parts
of that step are per id: mapping block ids to their interned codes, and
building the eviction columns. Both are done here with numpy (and C-level
list operations), in the same order and with the same results as the
one-by-one recording they replace.

``IntCodeTable`` caches ``block id -> code`` for non-negative int ids in a
flat int64 array (``-1``: not known to the table). It is only a cache of the
collector's ``dict``: a code is copied into it from the dict the first time
an id is flushed, and codes never change until ``reset`` (which clears both),
so a lookup in the table and one in the dict always agree.
"""

from __future__ import annotations

from array import array
from itertools import chain, repeat
from typing import Any

import numpy as np

__all__ = ["IntCodeTable", "extend_eviction_columns", "per_request"]

#: Largest int id the table covers (ids beyond take the dict path): 8 MiB of table.
_TABLE_MAX_ID = 1 << 20
_HASH_TYPES = frozenset((bytes, int, type(None)))


class IntCodeTable:
    """``codes[id]`` for pool block ids: one numpy gather per flush, not a dict get per id."""

    __slots__ = ("table",)

    def __init__(self) -> None:
        self.table = np.full(0, -1, dtype=np.int64)

    def clear(self) -> None:
        self.table = np.full(0, -1, dtype=np.int64)

    def codes(self, ids: list, codes_map: dict[Any, int], keys: list[Any]) -> np.ndarray | None:
        """Codes of ``ids`` (interning new ids in order of first appearance, into
        ``codes_map``/``keys``), or None when ``ids`` are not all small non-negative
        ints (the caller then takes the dict path). Nothing is interned on None."""
        try:
            arr = np.array(ids)
        except (ValueError, OverflowError, TypeError):
            return None
        if arr.dtype != np.int64 or arr.ndim != 1 or not len(arr):
            return None
        if int(arr.min()) < 0 or (hi := int(arr.max())) > _TABLE_MAX_ID:
            return None
        table = self.table
        if hi >= len(table):
            grown = np.full(min(max(hi + 1, 2 * len(table)), _TABLE_MAX_ID + 1), -1, np.int64)
            grown[: len(table)] = table
            self.table = table = grown
        out = table[arr]
        unknown = out < 0
        if unknown.any():
            new = arr[unknown]
            # distinct new ids in order of first appearance (no sort of every id)
            first = np.full(int(new.max()) + 1, len(new), dtype=np.int64)
            np.minimum.at(first, new, np.arange(len(new), dtype=np.int64))
            distinct = np.flatnonzero(first < len(new))
            values = distinct[np.argsort(first[distinct], kind="stable")].tolist()
            get = codes_map.get
            codes = []
            for v in values:  # one per distinct id not yet in the table
                c = get(v)
                if c is None:
                    c = len(keys)
                    keys.append(v)
                    codes_map[v] = c
                codes.append(c)
            table[values] = codes
            out[unknown] = table[new]
        return out


def extend_eviction_columns(
    batch: list[tuple],
    codes: np.ndarray,
    ev_block: array,
    ev_ts: array,
    ev_reason: list[str],
    ev_hash: list[Any],
) -> None:
    """Append queued eviction batches ``(ids, None, ts, reason, hashes, None)`` to the
    columns. A hash that is not ``bytes``/``int`` is stored as None."""
    lens = np.fromiter((len(p[0]) for p in batch), dtype=np.int64, count=len(batch))
    ev_block.frombytes(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    ts = np.fromiter((p[2] for p in batch), dtype=np.float64, count=len(batch))
    ev_ts.frombytes(np.repeat(ts, lens).tobytes())
    ev_reason.extend(chain.from_iterable(repeat(p[3], len(p[0])) for p in batch))
    hashes = list(
        chain.from_iterable(repeat(None, len(p[0])) if p[4] is None else p[4] for p in batch)
    )
    if not set(map(type, hashes)) <= _HASH_TYPES:  # rare: some other hash type
        hashes = [h if isinstance(h, (bytes, int)) else None for h in hashes]
    ev_hash.extend(hashes)


def per_request(values: list, lens: np.ndarray, dtype: Any) -> Any:
    """One int per request repeated over its rows; a scalar when all are equal
    (a pool hook's request / tier / size columns: one broadcast write)."""
    arr = np.asarray(values, dtype=dtype)
    if (arr == arr[0]).all():
        return arr[0]
    return np.repeat(arr, lens)
