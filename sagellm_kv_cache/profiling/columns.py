"""Rows of ``AccessStatsCollector.record_many``: columns given at once, checked, then interned.

Every column but the block ids may be a scalar (applied to all rows) or a
sequence of the rows' length; ``None`` (or ``-1`` for the integer columns)
means missing. Everything is checked before anything is interned, so a bad
column leaves the collector unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import KVCacheError, KVInvalidInputError, KVInvalidTypeError
from .interning import Interner

__all__ = ["build_rows"]


def build_rows(
    row_dtype: np.dtype,
    block_ids: Any,
    is_hit: Any,
    timestamps: Any,
    request_ids: Any,
    positions: Any,
    tier_values: Any,
    size_bytes: Any,
    interners: tuple[Interner, Interner, Interner],
) -> np.ndarray:
    """The records of ``len(block_ids)`` accesses as a ``row_dtype`` array (``block_ids``
    is a non-empty sequence or array, ``timestamps`` never None).

    Raises:
        KVInvalidTypeError: a column is not numeric, or an id is not str/int/bytes.
        KVInvalidInputError: a sequence has the wrong length.
    """
    blocks, requests, tiers = interners
    n = len(block_ids)
    rows = np.empty(n, dtype=row_dtype)
    # every plain column and every id is checked before anything is interned
    try:
        rows["timestamp"] = _column(timestamps, n, np.float64, "timestamps")
        rows["is_hit"] = _column(is_hit, n, bool, "is_hit")
        rows["position"] = _column(-1 if positions is None else positions, n, np.int64, "positions")
        rows["size_bytes"] = _column(
            -1 if size_bytes is None else size_bytes, n, np.int64, "size_bytes"
        )
    except KVCacheError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise KVInvalidTypeError(f"record_many: a column is not numeric ({exc})") from None
    for name, values in (("request_ids", request_ids), ("tiers", tier_values)):
        scalar = values is None or isinstance(values, (str, int, bytes))
        if not scalar and len(values) != n:
            raise KVInvalidInputError(f"{name} has {len(values)} entries, expected {n}")
    if not (isinstance(block_ids, np.ndarray) and block_ids.dtype.kind in "iu"):
        for key in set(map(type, block_ids)):
            if key is bool or not issubclass(key, (str, int, bytes)):
                raise KVInvalidTypeError(f"block_ids must be str, int or bytes, got {key.__name__}")
    rows["block"] = blocks.codes(block_ids)
    rows["request"] = requests.column(request_ids, n)
    rows["tier"] = tiers.column(tier_values, n)
    return rows


def _column(values: Any, n: int, dtype: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 0:
        return np.full(n, arr, dtype=dtype)
    if len(arr) != n:
        raise KVInvalidInputError(f"{name} has {len(arr)} entries, expected {n}")
    if arr.dtype == object:  # None entries mean missing
        arr = np.asarray([-1 if v is None else v for v in arr.tolist()])
    return arr.astype(dtype, copy=False)
