"""One interner: ids (block, request, tier) to dense int codes in first-seen order.

The collector stores every id as a code into the interner's ``keys``: a
code is assigned the first time an id is seen and never changes until
:meth:`Interner.clear`. Every way of recording (one access, a column of
ids, a queued batch of pool block ids) goes through :meth:`Interner.codes`
or :meth:`Interner.code`, so codes come out in the order one-by-one
recording would give them.

Pool block ids (small non-negative ints) take a fast path: a flat int64
table ``id -> code`` (``-1``: not known to it) turns a whole batch into codes
with one numpy gather; the dict is consulted once per id never seen before.
The table is only a cache of the dict (filled from it, cleared with it), so
both always agree.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Sequence
from itertools import compress
from typing import Any

import numpy as np

from ..errors import KVInvalidTypeError

__all__ = ["Interner", "check_id", "id_to_json", "kind_of"]

#: Largest int id the fast table covers (larger ids take the dict path): 8 MiB of table.
_TABLE_MAX_ID = 1 << 20
#: Batches at least this long try the table first.
_TABLE_MIN_BATCH = 256


class Interner:
    """``key -> code`` (dict) and ``code -> key`` (list), thread-safe on first sight.

    ``codes_map.get`` is lock-free and safe to call from any thread; new keys
    are added under ``lock`` so two threads never give one key two codes, and
    a key is in ``keys`` before any record can refer to its code.
    """

    __slots__ = ("_table", "codes_map", "keys", "lock")

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self.codes_map: dict[Any, int] = {}
        self.keys: list[Any] = []
        self.lock = threading.Lock() if lock is None else lock
        self._table = np.full(0, -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def clear(self) -> None:
        """Forget every key (containers are cleared in place, so held references stay valid)."""
        self.codes_map.clear()
        del self.keys[:]
        self._table = np.full(0, -1, dtype=np.int64)

    def code(self, key: Any) -> int:
        """The code of ``key``, assigning the next one when it is new."""
        code = self.codes_map.get(key)
        if code is None:
            with self.lock:
                code = self._add_locked(key)
        return code

    def _add_locked(self, key: Any) -> int:
        codes_map = self.codes_map
        code = codes_map.get(key)  # re-checked: another thread may have added it
        if code is None:
            code = len(self.keys)
            self.keys.append(key)
            codes_map[key] = code
        return code

    def _add_many_locked(self, distinct: list[Any]) -> list[int]:
        """Codes of distinct keys, the new ones added in the order given (C-level bulk
        operations: a pool's first pass interns thousands of block ids at once)."""
        codes_map = self.codes_map
        new = [k for k in distinct if k not in codes_map]
        if new:
            base = len(self.keys)
            self.keys.extend(new)
            codes_map.update(zip(new, range(base, base + len(new))))
        return list(map(codes_map.__getitem__, distinct))

    def codes(self, ids: Any) -> np.ndarray:
        """Codes of ``ids`` (a sequence or a 1-d int array) as an int64 array; new ids
        get codes in order of first appearance."""
        if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" and len(ids) >= _TABLE_MIN_BATCH:
            fast = self._table_codes(ids.astype(np.int64, copy=False))
            if fast is not None:
                return fast
            # large or negative ids: one dict operation per distinct id, not per access
            uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")  # first-appearance order
            mapped = np.empty(len(uniq), dtype=np.int64)
            mapped[order] = self._codes_list(uniq[order].tolist())
            return mapped[inverse.reshape(-1)]
        values = ids.tolist() if isinstance(ids, np.ndarray) else ids
        if len(values) >= _TABLE_MIN_BATCH and not isinstance(ids, np.ndarray):
            try:  # one C-level conversion; fails on anything but 64-bit ints
                arr = np.frombuffer(array("q", values), dtype=np.int64)
            except (TypeError, OverflowError):
                arr = None
            if arr is not None:
                fast = self._table_codes(arr)
                if fast is not None:
                    return fast
        return np.asarray(self._codes_list(values), dtype=np.int64)

    def _codes_list(self, ids: Any) -> list[int]:
        codes_map = self.codes_map
        known = list(map(codes_map.__contains__, ids))
        if not all(known):
            with self.lock:  # new ids get codes in order of first appearance
                self._add_many_locked(list(dict.fromkeys(compress(ids, [not k for k in known]))))
        return list(map(codes_map.__getitem__, ids))

    def _table_codes(self, arr: np.ndarray) -> np.ndarray | None:
        """Codes of an int64 array through the flat table, or None when the ids are not
        all in ``[0, _TABLE_MAX_ID]`` (nothing is interned then)."""
        if not len(arr) or int(arr.min()) < 0 or (hi := int(arr.max())) > _TABLE_MAX_ID:
            return None
        with self.lock:
            table = self._table
            if hi >= len(table):
                grown = np.full(min(max(hi + 1, 2 * len(table)), _TABLE_MAX_ID + 1), -1, np.int64)
                grown[: len(table)] = table
                self._table = table = grown
            out = table[arr]
            unknown = out < 0
            num_new = int(np.count_nonzero(unknown))
            if num_new:
                # a first batch is all new: no masked copy in or out
                new = arr if num_new == len(arr) else arr[unknown]
                # distinct new ids in order of first appearance (no sort of every id)
                first = np.full(int(new.max()) + 1, num_new, dtype=np.int64)
                np.minimum.at(first, new, np.arange(num_new, dtype=np.int64))
                distinct = np.flatnonzero(first < num_new)
                values = distinct[np.argsort(first[distinct], kind="stable")].tolist()
                table[values] = self._add_many_locked(values)
                if num_new == len(arr):
                    out = table[arr]
                else:
                    out[unknown] = table[new]
        return out

    def column(self, values: Any, n: int) -> np.ndarray:
        """``n`` codes of a column given as None (all missing), one key (for every
        row) or ``n`` keys with None for missing; missing is ``-1``."""
        if values is None:
            return np.full(n, -1, dtype=np.int64)
        if isinstance(values, (str, int, bytes)):
            return np.full(n, self.code(values), dtype=np.int64)
        values = values.tolist() if isinstance(values, np.ndarray) else list(values)
        if None not in values:
            return self.codes(values)
        present = [v is not None for v in values]
        out = np.full(n, -1, dtype=np.int64)
        out[np.asarray(present, dtype=bool)] = self._codes_list(list(compress(values, present)))
        return out


def check_id(key: Any, name: str) -> None:
    """Block and request ids are ``str``, ``int`` (not bool) or ``bytes``."""
    if isinstance(key, bool) or not isinstance(key, (str, int, bytes)):
        raise KVInvalidTypeError(f"{name} must be a str, int or bytes, got {type(key).__name__}")


def kind_of(keys: Sequence[Any]) -> str:
    """``"int"``, ``"str"``, ``"bytes"`` or ``"mixed"``: the kind of interned keys (``"str"`` if none)."""
    kinds = {
        ("bytes" if isinstance(k, bytes) else "int" if isinstance(k, int) else "str") for k in keys
    }
    if not kinds:
        return "str"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def id_to_json(key: Any) -> Any:
    """A key as JSON writes it: ``bytes`` as lowercase hex, ints as ints, else a string."""
    if isinstance(key, bytes):
        return key.hex()
    if isinstance(key, (int, np.integer)):
        return int(key)
    return key if isinstance(key, str) else str(key)
