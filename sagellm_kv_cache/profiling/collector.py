"""Compact collector of KV-block accesses.

One access is one fixed-width packed record (43 bytes) appended to a single
``bytearray``; nothing is allocated per event beyond those bytes, and the
buffer is read back as a numpy structured array whose fields are the
columns::

    field        type     meaning
    block        int64    interned block id (code into ``block_keys``)
    timestamp    float64  seconds (collector clock, or the caller's clock)
    request      int64    interned request id, -1 none
    position     int64    block position in the prompt, -1 none
    size_bytes   int64    bytes of the block, -1 none
    tier         int16    interned tier name ("gpu", "cpu"...), -1 none
    is_hit       int8     1 hit, 0 miss

Why one packed buffer and not seven column arrays: a row goes in with one
C call (``struct.pack`` then ``bytearray.extend``), which is atomic, so
appends need no lock and cost ~0.5 µs; seven ``array.append`` calls under a
lock cost about twice that. The buffer grows geometrically (amortised O(1)).
Block, request and tier ids are interned through a dict (``dict.get`` on the
hot path), so a block id may be a ``str`` (``"block_001"``), an ``int`` (pool
block ids) or ``bytes`` (block hashes).

Export formats (:meth:`AccessStatsCollector.export_stats`):

* ``.json``: ``{"format": "sagellm-kv-access-stats", "version": 1,
  "block_id_type": "int" | "str" | "bytes" | "mixed", "summary": {...},
  "time_windows": {...}, "accesses": {column: [values...]},
  "evictions": {"block_id": [...], "timestamp": [...], "reason": [...],
  "block_hash": [...]}}``. Columns are lists of equal length; ``null`` marks
  a missing value. Block ids are written as JSON ints or strings; ``bytes``
  ids (and block hashes) as lowercase hex strings; ids are restored to
  ``bytes`` on load when ``block_id_type`` is ``"bytes"`` (hashes stay hex). ``summary`` and
  ``time_windows`` are informational: :meth:`AccessStatsCollector.load`
  recomputes them from ``accesses``.
* ``.parquet``: the event table of :meth:`to_polars` (columns ``timestamp``,
  ``block_id``, ``is_hit``, ``request_id``, ``position``, ``tier``,
  ``size_bytes``, ``block_code``; codes are recomputed on load) with the format
  name, version, ``block_id_type``, time windows and evictions as JSON in the
  schema metadata key ``sagellm_kv_cache.access_stats``.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, compress
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KVCacheError, KVInvalidInputError, KVInvalidTypeError, KVTraceFormatError
from ._codes import IntCodeTable, extend_eviction_columns, per_request
from .reuse import previous_access_index, reuse_distances, reuse_times
from .spill import SpillStore

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TIME_WINDOWS",
    "AccessEvent",
    "AccessStatsCollector",
    "EvictionEvent",
    "position_bucket_edges",
]

#: Window sizes of the per-window statistics: name -> seconds.
TIME_WINDOWS: dict[str, float] = {"1s": 1.0, "10s": 10.0, "60s": 60.0}
FORMAT_NAME = "sagellm-kv-access-stats"
FORMAT_VERSION = 1
_PARQUET_META_KEY = b"sagellm_kv_cache.access_stats"
_NUM_HOTTEST = 10
_PERCENTILES = (50, 90, 99)
_ACCESS_COLUMNS = (
    "block_id",
    "timestamp",
    "is_hit",
    "request_id",
    "position",
    "tier",
    "size_bytes",
)

BlockId = str | int | bytes

#: One access as a packed, fixed-width record (43 bytes, no padding):
#: block code, timestamp (s), request code, position, size in bytes,
#: tier code (-1 = missing for the last four), hit flag.
_ROW = struct.Struct("<qdqqqhb")
ROW_DTYPE = np.dtype(
    [
        ("block", "<i8"),
        ("timestamp", "<f8"),
        ("request", "<i8"),
        ("position", "<i8"),
        ("size_bytes", "<i8"),
        ("tier", "<i2"),
        ("is_hit", "i1"),
    ]
)
assert ROW_DTYPE.itemsize == _ROW.size, "record layout and numpy view disagree"


@dataclass(frozen=True, slots=True)
class AccessEvent:
    """One recorded access (built on demand by :meth:`AccessStatsCollector.iter_events`)."""

    block_id: BlockId
    timestamp: float
    is_hit: bool
    request_id: str | int | None = None
    position: int | None = None
    tier: str | None = None
    size_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class EvictionEvent:
    """One recorded eviction."""

    block_id: BlockId
    timestamp: float
    reason: str
    block_hash: bytes | int | None = None


def position_bucket_edges(max_position: int) -> list[int]:
    """Lower edges of the power-of-two position buckets ``0, 1, 2-3, 4-7, ...``.

    Args:
        max_position: the largest position to cover.

    Returns:
        ``[0, 1, 2, 4, 8, ...]`` up to the bucket holding ``max_position``.
    """
    edges = [0]
    lo = 1
    while lo <= max_position:
        edges.append(lo)
        lo *= 2
    return edges


def _bucket_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _id_to_json(key: Any) -> Any:
    if isinstance(key, bytes):
        return key.hex()
    if isinstance(key, (int, np.integer)):
        return int(key)
    return key if isinstance(key, str) else str(key)


def _check_id(key: Any, name: str) -> None:
    """Block and request ids are ``str``, ``int`` (not bool) or ``bytes``."""
    if isinstance(key, bool) or not isinstance(key, (str, int, bytes)):
        raise KVInvalidTypeError(f"{name} must be a str, int or bytes, got {type(key).__name__}")


def _bad_record(exc: Exception) -> KVCacheError:
    """The typed error of a field that does not fit its packed column."""
    text = str(exc)
    if "out of range" in text or "format requires" in text:
        return KVInvalidInputError(f"a field does not fit its 64-bit column ({text})")
    return KVInvalidTypeError(f"bad field type ({text}): ids are str/int/bytes, numbers numeric")


def _kind_of(keys: Sequence[Any]) -> str:
    kinds = {
        ("bytes" if isinstance(k, bytes) else "int" if isinstance(k, int) else "str") for k in keys
    }
    if not kinds:
        return "str"
    return kinds.pop() if len(kinds) == 1 else "mixed"


class AccessStatsCollector:
    """Collects KV-block accesses in a packed record buffer and summarises them.

    Example::

        collector = AccessStatsCollector()
        collector.record_access("block_001", is_hit=True)
        collector.record_access("block_002", is_hit=False)
        collector.get_stats_summary()["hit_rate"]   # 0.5
        collector.export_stats("stats.json")

    Thread safety: a row is packed first and then appended with one
    ``bytearray.extend`` (a single C call, atomic), so concurrent
    :meth:`record_access` calls never interleave fields of two rows and the
    hot path takes no lock. A lock guards the rare paths: interning a new id,
    evictions, snapshots and :meth:`reset`. Analyses work on a snapshot.

    Memory: unbounded by default (43 bytes per access, about 40 per eviction).
    With ``max_records_in_memory=N`` the collector keeps at most about ``N``
    access + eviction records in memory and moves older ones to Parquet part
    files (:mod:`sagellm_kv_cache.profiling.spill`); every summary, table and
    export reads them back, so results equal an unbounded collector's. The
    interned ids (one entry per distinct block, request and tier) stay in memory.

    Args:
        clock: returns seconds; default ``time.monotonic``. Timestamps not
            given to :meth:`record_access` are ``clock() - clock_at_start``.
        time_windows: window name -> seconds for the per-window statistics;
            default :data:`TIME_WINDOWS`.
        max_records_in_memory: the bound above (a positive int), or None.
        spill_dir: where the spill folder is created; default the system temp folder.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        time_windows: dict[str, float] | None = None,
        max_records_in_memory: int | None = None,
        spill_dir: str | Path | None = None,
    ) -> None:
        limit = max_records_in_memory
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise KVInvalidInputError(
                f"max_records_in_memory must be a positive int or None, got {limit!r}"
            )
        self.max_records_in_memory = limit
        self._spill = SpillStore(ROW_DTYPE, spill_dir) if limit is not None else None
        windows = dict(TIME_WINDOWS if time_windows is None else time_windows)
        for name, seconds in windows.items():
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise KVInvalidTypeError(
                    f"time window {name!r} must be a number of seconds, got {seconds!r}"
                )
            if not seconds > 0:
                raise KVInvalidInputError(
                    f"time window {name!r} must be > 0 seconds, got {seconds!r}"
                )
        self.time_windows = windows
        self._clock = clock
        self._lock = threading.Lock()
        # Every container below is created once and only ever cleared in
        # place, so the closures of record_access stay valid across reset().
        self._rows = bytearray()
        self._origin = [clock()]  # one cell: reset() moves it, closures read it
        self._block_codes: dict[Any, int] = {}
        self._block_keys: list[Any] = []
        self._int_codes = IntCodeTable()  # a cache of _block_codes for pool block ids
        self._request_codes: dict[Any, int] = {}
        self._request_keys: list[Any] = []
        self._tier_codes: dict[Any, int] = {}
        self._tier_keys: list[Any] = []
        # evictions, columnar (no object per eviction for the garbage collector to walk)
        self._ev_block = array("q")
        self._ev_ts = array("d")
        self._ev_reason: list[str] = []
        self._ev_hash: list[Any] = []
        self._pending: list[tuple] = []  # queued record_prompt calls (see _flush_pending)
        # The hot path, specialised once: an instance attribute shadows the
        # documented method below.
        self.record_access = self._make_record_access()

    # ------------------------------------------------------------------ recording
    def reset(self) -> None:
        """Drop every recorded access and eviction and restart the clock."""
        with self._lock:
            del self._pending[:]
            del self._rows[:]
            self._origin[0] = self._clock()
            for container in (
                self._block_codes,
                self._block_keys,
                self._request_codes,
                self._request_keys,
                self._tier_codes,
                self._tier_keys,
                self._ev_reason,
                self._ev_hash,
            ):
                container.clear()
            del self._ev_block[:]
            del self._ev_ts[:]
            self._int_codes.clear()
            if self._spill is not None:
                self._spill.clear()

    @property
    def records_in_memory(self) -> int:
        """Access + eviction records held in memory now (queued calls not counted)."""
        return len(self._rows) // ROW_DTYPE.itemsize + len(self._ev_block)

    def _maybe_spill(self) -> None:
        """Move the in-memory records to the spill store once over the bound."""
        spill = self._spill
        if spill is None or self.records_in_memory <= self.max_records_in_memory:
            return
        with self._lock:
            n = len(self._rows) // ROW_DTYPE.itemsize * ROW_DTYPE.itemsize
            raw = bytes(self._rows[:n])
            del self._rows[:n]  # rows appended meanwhile (lock-free) land after n and stay
            ev = (self._ev_block, self._ev_ts, self._ev_reason, self._ev_hash)
            spill.write_evictions(*ev)
            del self._ev_block[:], self._ev_ts[:], self._ev_reason[:], self._ev_hash[:]
            spill.write_rows(raw)

    def record_access(
        self,
        block_id: BlockId,
        is_hit: bool = False,
        *,
        timestamp: float | None = None,
        request_id: str | int | None = None,
        position: int | None = None,
        tier: str | None = None,
        size_bytes: int | None = None,
    ) -> None:
        """Record one access to ``block_id``.

        Args:
            block_id: the block (``str``, ``int`` or ``bytes``).
            is_hit: whether the block was found in the cache.
            timestamp: seconds; default now on the collector clock.
            request_id: the request that touched the block.
            position: the block's index in the request's prompt (0 = first block).
            tier: where the block lives ("gpu", "cpu", ...).
            size_bytes: the block's size.
        """
        # Instances shadow this with the closure built by _make_record_access;
        # this body only runs when called through the class.
        self.__dict__["record_access"](
            block_id,
            is_hit,
            timestamp=timestamp,
            request_id=request_id,
            position=position,
            tier=tier,
            size_bytes=size_bytes,
        )

    def _make_record_access(self) -> Callable[..., None]:
        # Everything the hot path touches is a closure cell (no attribute
        # lookups): ~1 µs budget per call for >= 1M calls/s.
        block_get = self._block_codes.get
        request_get = self._request_codes.get
        tier_get = self._tier_codes.get
        intern = self._intern
        block_codes, block_keys = self._block_codes, self._block_keys
        request_codes, request_keys = self._request_codes, self._request_keys
        tier_codes, tier_keys = self._tier_codes, self._tier_keys
        clock = self._clock
        origin = self._origin
        append_row = self._rows.extend
        pack = _ROW.pack
        pending = self._pending
        flush = self._flush_pending
        rows = self._rows
        # bytes in memory that trigger a spill check (only when bounded)
        bounded = self._spill is not None
        spill_at = ((self.max_records_in_memory or 0) + 1) * ROW_DTYPE.itemsize
        maybe_spill = self._maybe_spill

        def first_sight(block_id, request_id, tier, timestamp, position, size_bytes, is_hit):
            # a new id: check every field (a trial pack) before interning anything
            pos = -1 if position is None else position
            size = -1 if size_bytes is None else size_bytes
            hit = 1 if is_hit else 0
            pack(0, timestamp, 0, pos, size, 0, hit)
            _check_id(block_id, "block_id")
            if request_id is not None:
                _check_id(request_id, "request_id")
            if tier is not None and not isinstance(tier, str):
                raise KVInvalidTypeError(f"tier must be a str, got {type(tier).__name__}")
            code = block_get(block_id)
            if code is None:
                code = intern(block_codes, block_keys, block_id)
            req = -1
            if request_id is not None:
                req = request_get(request_id)
                if req is None:
                    req = intern(request_codes, request_keys, request_id)
            tier_code = -1
            if tier is not None:
                tier_code = tier_get(tier)
                if tier_code is None:
                    tier_code = intern(tier_codes, tier_keys, tier)
            return pack(code, timestamp, req, pos, size, tier_code, hit)

        def record_access(
            block_id: BlockId,
            is_hit: bool = False,
            *,
            timestamp: float | None = None,
            request_id: str | int | None = None,
            position: int | None = None,
            tier: str | None = None,
            size_bytes: int | None = None,
        ) -> None:
            if pending:  # rows keep call order
                flush()
            if timestamp is None:
                timestamp = clock() - origin[0]
            try:
                # fast path: every id seen before; nothing changes until the row packs
                code = block_get(block_id)
                req = -1 if request_id is None else request_get(request_id)
                tier_code = -1 if tier is None else tier_get(tier)
                if code is None or req is None or tier_code is None:
                    row = first_sight(
                        block_id, request_id, tier, timestamp, position, size_bytes, is_hit
                    )
                else:
                    row = pack(
                        code,
                        timestamp,
                        req,
                        -1 if position is None else position,
                        -1 if size_bytes is None else size_bytes,
                        tier_code,
                        1 if is_hit else 0,
                    )
            except (TypeError, struct.error) as exc:
                raise _bad_record(exc) from None
            append_row(row)
            if bounded and len(rows) >= spill_at:
                maybe_spill()

        record_access.__doc__ = AccessStatsCollector.record_access.__doc__
        return record_access

    def record_many(
        self,
        block_ids: Sequence[BlockId] | np.ndarray,
        is_hit: Sequence[bool] | np.ndarray | bool,
        *,
        timestamps: Sequence[float] | np.ndarray | float | None = None,
        request_ids: Sequence[str | int | None] | str | int | None = None,
        positions: Sequence[int] | np.ndarray | int | None = None,
        tiers: Sequence[str | None] | str | None = None,
        size_bytes: Sequence[int] | np.ndarray | int | None = None,
    ) -> None:
        """Record many accesses at once (vectorised :meth:`record_access`).

        Every argument but ``block_ids`` may be a scalar (applied to all) or a
        sequence of the same length; ``None`` (or ``-1`` for the integer
        columns) means missing. The rows are appended in one atomic step.

        Raises:
            KVInvalidInputError: a sequence has the wrong length.
        """
        if isinstance(block_ids, (str, bytes)) or not hasattr(block_ids, "__len__"):
            raise KVInvalidTypeError(
                f"block_ids must be a sequence or array, got {type(block_ids).__name__}"
            )
        n = len(block_ids)
        if n == 0:
            return
        if self._pending:
            self._flush_pending()
        rows = np.empty(n, dtype=ROW_DTYPE)
        # every plain column and every id is checked before anything is interned
        try:
            if timestamps is None:
                rows["timestamp"] = self._clock() - self._origin[0]
            else:
                rows["timestamp"] = self._column(timestamps, n, np.float64, "timestamps")
            rows["is_hit"] = self._column(is_hit, n, bool, "is_hit")
            rows["position"] = self._column(
                -1 if positions is None else positions, n, np.int64, "positions"
            )
            rows["size_bytes"] = self._column(
                -1 if size_bytes is None else size_bytes, n, np.int64, "size_bytes"
            )
        except KVCacheError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise KVInvalidTypeError(f"record_many: a column is not numeric ({exc})") from None
        for name, values in (("request_ids", request_ids), ("tiers", tiers)):
            scalar = values is None or isinstance(values, (str, int, bytes))
            if not scalar and len(values) != n:
                raise KVInvalidInputError(f"{name} has {len(values)} entries, expected {n}")
        if not (isinstance(block_ids, np.ndarray) and block_ids.dtype.kind in "iu"):
            for key in set(map(type, block_ids)):
                if key is bool or not issubclass(key, (str, int, bytes)):
                    raise KVInvalidTypeError(
                        f"block_ids must be str, int or bytes, got {key.__name__}"
                    )
        rows["block"] = self._intern_many(self._block_codes, self._block_keys, block_ids)
        rows["request"] = self._interned_column(
            request_ids, n, self._request_codes, self._request_keys, "request_ids"
        )
        rows["tier"] = self._interned_column(tiers, n, self._tier_codes, self._tier_keys, "tiers")
        self._rows.extend(rows.tobytes())
        self._maybe_spill()

    def record_prompt(
        self,
        block_ids: Sequence[BlockId],
        num_hit_blocks: int,
        *,
        timestamp: float,
        request_id: str | int | None = None,
        tier: str | None = None,
        size_bytes: int | None = None,
    ) -> None:
        """One request's prompt blocks: ``block_ids[i]`` at position ``i``, the first
        ``num_hit_blocks`` hits and the rest misses (what :class:`AccessStatsHook` records
        per lookup).

        The call only queues the request (one list append, O(1) however long
        the prompt); queued requests become rows in one vectorised step when
        anything reads the collector or records through another method, or
        every 4096 requests, so the order of rows is the order of calls.
        """
        if not isinstance(block_ids, (list, tuple, np.ndarray)):
            raise KVInvalidTypeError(
                f"block_ids must be a list, tuple or array, got {type(block_ids).__name__}"
            )
        if isinstance(num_hit_blocks, bool) or not isinstance(num_hit_blocks, (int, np.integer)):
            raise KVInvalidTypeError(
                f"num_hit_blocks must be an int, got {type(num_hit_blocks).__name__}"
            )
        if not 0 <= num_hit_blocks <= len(block_ids):
            raise KVInvalidInputError(
                f"num_hit_blocks must be in [0, {len(block_ids)}], got {num_hit_blocks}"
            )
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float, np.number)):
            raise KVInvalidTypeError(f"timestamp must be a number, got {type(timestamp).__name__}")
        if len(block_ids):
            self._pending.append(
                (list(block_ids), num_hit_blocks, timestamp, request_id, tier, size_bytes)
            )
            if len(self._pending) >= 4096:
                self._flush_pending()

    def _flush_pending(self) -> None:
        """Record the queued calls (:meth:`_flush_queue`), then spill if over the bound."""
        self._flush_queue()
        if self._spill is not None:
            self._maybe_spill()

    def _flush_queue(self) -> None:
        """Turn queued prompt / eviction batches into records, in call order.

        Block codes are assigned over every queued id in call order (as
        per-call recording would), then all prompts become rows in one
        vectorised step and all evictions in one list extension.
        """
        pending = self._pending
        with self._lock:
            n = len(pending)
            if not n:
                return
            batch = pending[:n]
            del pending[:n]  # appends racing this call land after index n and stay
            codes = self._codes_locked(list(chain.from_iterable(p[0] for p in batch)))
            prompts = [p for p in batch if p[1] is not None]
            if len(prompts) == n:
                self._flush_prompts_locked(prompts, codes)
                return
            codes_arr = np.asarray(codes, dtype=np.int64)
            if prompts:
                lens = np.fromiter((len(p[0]) for p in batch), dtype=np.int64, count=n)
                is_prompt = np.fromiter((p[1] is not None for p in batch), dtype=bool, count=n)
                mask = np.repeat(is_prompt, lens)
                self._flush_prompts_locked(prompts, codes_arr[mask])
                codes_arr = codes_arr[~mask]
            extend_eviction_columns(
                [p for p in batch if p[1] is None],
                codes_arr,
                self._ev_block,
                self._ev_ts,
                self._ev_reason,
                self._ev_hash,
            )

    def _codes_locked(self, ids: list) -> Any:
        """Block codes of ``ids`` (a list or an int64 array), interning new ids in order
        of first appearance, as one-by-one recording would."""
        codes_map = self._block_codes
        keys = self._block_keys
        if len(ids) > 4096:
            # pool block ids: one numpy gather, a dict operation per id never seen
            # before. Only when every id is an int (a True among them equals 1, as
            # a dict key would)
            codes = self._int_codes.codes(ids, codes_map, keys)
            if codes is not None:
                return codes
        codes = list(map(codes_map.get, ids))
        if None in codes:
            # new ids get codes in order of first appearance
            missing = dict.fromkeys(compress(ids, [c is None for c in codes]))
            base = len(keys)
            keys.extend(missing)
            codes_map.update(zip(missing, range(base, base + len(missing))))
            codes = list(map(codes_map.__getitem__, ids))
        return codes

    def _flush_prompts_locked(self, batch: list[tuple], codes: Any) -> None:
        n_req = len(batch)
        lens = np.fromiter((len(p[0]) for p in batch), dtype=np.int64, count=n_req)
        total = int(lens.sum())
        intern = self._intern_locked
        reqs = [
            -1 if p[3] is None else intern(self._request_codes, self._request_keys, p[3])
            for p in batch
        ]
        tiers = [
            -1 if p[4] is None else intern(self._tier_codes, self._tier_keys, p[4]) for p in batch
        ]
        positions = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        rows = np.empty(total, dtype=ROW_DTYPE)
        rows["block"] = codes
        rows["timestamp"] = np.repeat(np.asarray([p[2] for p in batch], dtype=np.float64), lens)
        rows["request"] = per_request(reqs, lens, np.int64)
        rows["position"] = positions
        rows["size_bytes"] = per_request(
            [-1 if p[5] is None else p[5] for p in batch], lens, np.int64
        )
        rows["tier"] = per_request(tiers, lens, np.int16)
        hits = np.repeat(np.asarray([p[1] for p in batch], dtype=np.int64), lens)
        rows["is_hit"] = positions < hits
        self._rows += rows.data

    def _intern_locked(self, codes: dict[Any, int], keys: list[Any], key: Any) -> int:
        code = codes.get(key)
        if code is None:
            code = len(keys)
            keys.append(key)
            codes[key] = code
        return code

    def record_eviction(
        self,
        block_id: BlockId,
        reason: str = "capacity",
        *,
        timestamp: float | None = None,
        block_hash: bytes | int | None = None,
    ) -> None:
        """Record that ``block_id`` was evicted (for ``reason``: "capacity", "explicit", ...)."""
        if self._pending:
            self._flush_pending()
        _check_id(block_id, "block_id")
        if timestamp is None:
            timestamp = self._clock() - self._origin[0]
        try:
            timestamp = float(timestamp)
        except (TypeError, ValueError):
            raise KVInvalidTypeError(f"timestamp must be a number, got {timestamp!r}") from None
        code = self._block_codes.get(block_id)
        if code is None:
            code = self._intern(self._block_codes, self._block_keys, block_id)
        with self._lock:
            self._ev_block.append(code)
            self._ev_ts.append(float(timestamp))
            self._ev_reason.append(str(reason))
            self._ev_hash.append(block_hash)
        if self._spill is not None:
            self._maybe_spill()

    def record_evictions(
        self,
        block_ids: Sequence[BlockId],
        reason: str = "capacity",
        *,
        timestamp: float | None = None,
        block_hashes: Sequence[bytes | int | None] | None = None,
    ) -> None:
        """:meth:`record_eviction` for many blocks evicted together.

        Queued like :meth:`record_prompt` (O(1) per call) and recorded, after
        the queued prompts, at the next read.
        """
        if not block_ids:
            return
        if block_hashes is not None and len(block_hashes) != len(block_ids):
            raise KVInvalidInputError(
                f"block_hashes has {len(block_hashes)} entries for {len(block_ids)} block ids"
            )
        if timestamp is None:
            timestamp = self._clock() - self._origin[0]
        self._pending.append(
            (
                list(block_ids),
                None,  # marks an eviction batch
                float(timestamp),
                str(reason),
                None if block_hashes is None else list(block_hashes),
                None,
            )
        )
        if len(self._pending) >= 4096:
            self._flush_pending()

    def _intern(self, codes: dict[Any, int], keys: list[Any], key: Any) -> int:
        # Slow path, first sight of a key: recheck under the lock so two
        # threads never give one key two codes. The key is in ``keys`` before
        # any row can refer to its code.
        with self._lock:
            code = codes.get(key)
            if code is None:
                code = len(keys)
                keys.append(key)
                codes[key] = code
            return code

    def _intern_many(self, codes: dict[Any, int], keys: list[Any], values: Any) -> np.ndarray:
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu" and len(values) > 4096:
            # big arrays: one dict lookup per distinct id, not per access
            uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
            # intern new ids in order of first appearance, as record_access would
            order = np.argsort(first, kind="stable")
            mapped = np.empty(len(uniq), dtype=np.int64)
            mapped[order] = self._intern_many(codes, keys, uniq[order].tolist())
            return mapped[inverse.reshape(-1)]
        if isinstance(values, np.ndarray):
            values = values.tolist()
        get = codes.get
        out = [get(v) for v in values]
        if None in out:
            out = [
                c if c is not None else self._intern(codes, keys, v) for c, v in zip(out, values)
            ]
        return np.asarray(out, dtype=np.int64)

    def _interned_column(
        self, values: Any, n: int, codes: dict, keys: list, name: str
    ) -> np.ndarray:
        if values is None:
            return np.full(n, -1, dtype=np.int64)
        if isinstance(values, (str, int, bytes)):
            code = codes.get(values)
            if code is None:
                code = self._intern(codes, keys, values)
            return np.full(n, code, dtype=np.int64)
        if len(values) != n:
            raise KVInvalidInputError(f"{name} has {len(values)} entries, expected {n}")
        values = values.tolist() if isinstance(values, np.ndarray) else list(values)
        get = codes.get
        out = [-1 if v is None else get(v) for v in values]
        if None in out:
            out = [
                c if c is not None else self._intern(codes, keys, v) for c, v in zip(out, values)
            ]
        return np.asarray(out, dtype=np.int64)

    @staticmethod
    def _column(values: Any, n: int, dtype: Any, name: str) -> np.ndarray:
        arr = np.asarray(values)
        if arr.ndim == 0:
            return np.full(n, arr, dtype=dtype)
        if len(arr) != n:
            raise KVInvalidInputError(f"{name} has {len(arr)} entries, expected {n}")
        if arr.dtype == object:  # None entries mean missing
            arr = np.asarray([-1 if v is None else v for v in arr.tolist()])
        return arr.astype(dtype, copy=False)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        if self._pending:
            self._flush_pending()
        spilled = self._spill.num_rows if self._spill is not None else 0
        return spilled + len(self._rows) // ROW_DTYPE.itemsize

    @property
    def num_evictions(self) -> int:
        """Number of recorded evictions."""
        if self._pending:
            self._flush_pending()
        spilled = self._spill.num_evictions if self._spill is not None else 0
        return spilled + len(self._ev_block)

    def _snapshot(self) -> dict[str, Any]:
        """Column copies of the buffers as numpy arrays, taken under the lock."""
        if self._pending:
            self._flush_pending()
        with self._lock:
            raw = bytes(self._rows)  # a copy: the bytearray never stays exported
            keys = (list(self._block_keys), list(self._request_keys), list(self._tier_keys))
            ev_block = np.array(self._ev_block, dtype=np.int64)
            ev_ts = np.array(self._ev_ts, dtype=np.float64)
            ev_reason = list(self._ev_reason)
            ev_hash = list(self._ev_hash)
            spill = self._spill
            if spill is not None and (spill.num_rows or spill.num_evictions):
                # spilled records come first (they are older), read under the lock so
                # a concurrent spill cannot move records between the two reads
                old_rows = spill.read_rows()
                old_block, old_ts, old_reason, old_hash = spill.read_evictions()
            else:
                spill = None
        rows = np.frombuffer(raw, dtype=ROW_DTYPE)
        if spill is not None:
            rows = np.concatenate([old_rows, rows])
            ev_block = np.concatenate([old_block, ev_block])
            ev_ts = np.concatenate([old_ts, ev_ts])
            ev_reason = old_reason + ev_reason
            ev_hash = old_hash + ev_hash
        return {
            "block": rows["block"].astype(np.int64),
            "timestamp": rows["timestamp"].astype(np.float64),
            "is_hit": rows["is_hit"].astype(bool),
            "request": rows["request"].astype(np.int64),
            "position": rows["position"].astype(np.int64),
            "tier": rows["tier"].astype(np.int64),
            "size_bytes": rows["size_bytes"].astype(np.int64),
            "block_keys": keys[0],
            "request_keys": keys[1],
            "tier_keys": keys[2],
            "evict_block": ev_block,
            "evict_ts": ev_ts,
            "evict_reason": ev_reason,
            "evict_hash": ev_hash,
        }

    def iter_events(self) -> Iterator[AccessEvent]:
        """Yield every access as an :class:`AccessEvent` (slow; for small collections and tests)."""
        s = self._snapshot()
        for b, t, h, r, p, tr, sz in zip(
            s["block"].tolist(),
            s["timestamp"].tolist(),
            s["is_hit"].tolist(),
            s["request"].tolist(),
            s["position"].tolist(),
            s["tier"].tolist(),
            s["size_bytes"].tolist(),
        ):
            yield AccessEvent(
                block_id=s["block_keys"][b],
                timestamp=t,
                is_hit=h,
                request_id=None if r < 0 else s["request_keys"][r],
                position=None if p < 0 else p,
                tier=None if tr < 0 else s["tier_keys"][tr],
                size_bytes=None if sz < 0 else sz,
            )

    def iter_evictions(self) -> Iterator[EvictionEvent]:
        """Yield every recorded eviction as an :class:`EvictionEvent`."""
        s = self._snapshot()
        for b, t, reason, h in zip(
            s["evict_block"].tolist(), s["evict_ts"].tolist(), s["evict_reason"], s["evict_hash"]
        ):
            yield EvictionEvent(
                block_id=s["block_keys"][b], timestamp=t, reason=reason, block_hash=h
            )

    @property
    def block_id_type(self) -> str:
        """``"int"``, ``"str"``, ``"bytes"`` or ``"mixed"``: the kind of the block ids seen."""
        with self._lock:
            keys = list(self._block_keys)
        return _kind_of(keys)

    # ------------------------------------------------------------------ summary
    def get_stats_summary(self) -> dict[str, Any]:
        """Summary of everything recorded so far (JSON-serialisable).

        Returns:
            A dict with

            * ``total_accesses``, ``hits``, ``misses``, ``hit_rate`` (block
              hit ratio: hits / accesses, 0.0 when empty), ``unique_blocks``,
              ``unique_requests``, ``start_s``, ``end_s``, ``duration_s``,
              ``accesses_per_s``;
            * ``time_windows``: per window name, ``window_s``, ``num_windows``,
              and per-window lists ``start_s``, ``accesses``, ``hits``,
              ``hit_rate`` (windows start at the first access);
            * ``reuse_distance``: ``count`` (reuses), ``cold`` (first
              accesses), ``mean``, ``percentiles`` {"p50", "p90", "p99"} and a
              power-of-two ``histogram`` {"bin_lo", "bin_hi", "count"};
            * ``reuse_time_s``: ``count``, ``mean``, ``percentiles``;
            * ``hottest_blocks``: the 10 most accessed blocks, each
              {"block_id", "accesses", "hits"};
            * ``hit_rate_by_position``: power-of-two prompt position buckets,
              each {"bucket", "position_lo", "position_hi", "accesses", "hits",
              "hit_rate"};
            * ``evictions``: {"total", "by_reason"}.
        """
        return _summarize(self._snapshot(), self.time_windows)

    # ------------------------------------------------------------------ tables
    def to_polars(self) -> Any:
        """The event table as a ``polars.DataFrame``.

        Columns: ``timestamp`` (Float64, s), ``block_id`` (Int64 when every
        block id is an int, else String; bytes as hex), ``block_code``
        (Int64, first-seen order), ``is_hit`` (Boolean), ``request_id``
        (String, null), ``position`` (Int64, null), ``tier`` (String, null),
        ``size_bytes`` (Int64, null).
        """
        import polars as pl

        return _to_polars(self._snapshot(), pl)

    def to_pandas(self) -> Any:
        """The event table of :meth:`to_polars` as a ``pandas.DataFrame``.

        ``position`` and ``size_bytes`` are pandas nullable ``Int64``;
        ``request_id`` and ``tier`` hold ``None``/NA where missing.
        """
        df = self.to_polars().to_pandas()
        return df.astype({"position": "Int64", "size_bytes": "Int64"})

    def evictions_to_polars(self) -> Any:
        """Evictions as a ``polars.DataFrame``: ``timestamp``, ``block_id``, ``reason``, ``block_hash``."""
        import polars as pl

        s = self._snapshot()
        keys = s["block_keys"]
        return pl.DataFrame(
            {
                "timestamp": s["evict_ts"],
                "block_id": [_id_to_json(keys[b]) for b in s["evict_block"].tolist()]
                if _kind_of(keys) != "int"
                else [keys[b] for b in s["evict_block"].tolist()],
                "reason": s["evict_reason"],
                "block_hash": [None if h is None else str(_id_to_json(h)) for h in s["evict_hash"]],
            },
            schema_overrides={
                "timestamp": pl.Float64,
                "reason": pl.String,
                "block_hash": pl.String,
            },
        )

    # ------------------------------------------------------------------ export / load
    def export_stats(self, path: str | Path) -> Path:
        """Write accesses, evictions and the summary to ``path``.

        The suffix picks the format: ``.json`` or ``.parquet`` (see the module
        docstring for both layouts).

        Returns:
            The path written.

        Raises:
            KVInvalidInputError: the suffix is neither ``.json`` nor ``.parquet``.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            doc = self.to_json_dict()
            with path.open("w", encoding="utf-8") as f:
                json.dump(doc, f, separators=(",", ":"))
            return path
        if suffix == ".parquet":
            self._write_parquet(path)
            return path
        raise KVInvalidInputError(
            f"{path}: unknown export format {path.suffix!r}; use .json or .parquet"
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The document :meth:`export_stats` writes for ``.json``."""
        s = self._snapshot()
        summary = _summarize(s, self.time_windows)
        windows = summary.pop("time_windows")
        keys = s["block_keys"]
        block_json = [_id_to_json(k) for k in keys]
        req_json = [_id_to_json(k) for k in s["request_keys"]]
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "block_id_type": _kind_of(keys),
            "summary": summary,
            "time_windows": windows,
            "accesses": {
                "block_id": [block_json[b] for b in s["block"].tolist()],
                "timestamp": s["timestamp"].tolist(),
                "is_hit": s["is_hit"].tolist(),
                "request_id": [None if r < 0 else req_json[r] for r in s["request"].tolist()],
                "position": [None if p < 0 else p for p in s["position"].tolist()],
                "tier": [None if t < 0 else s["tier_keys"][t] for t in s["tier"].tolist()],
                "size_bytes": [None if b < 0 else b for b in s["size_bytes"].tolist()],
            },
            "evictions": _evictions_json(s),
        }

    def _write_parquet(self, path: Path) -> None:
        import pyarrow.parquet as pq

        s = self._snapshot()
        table = _to_polars(s, __import__("polars")).to_arrow()
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "block_id_type": _kind_of(s["block_keys"]),
            "time_windows": self.time_windows,
            "evictions": _evictions_json(s),
        }
        table = table.replace_schema_metadata({_PARQUET_META_KEY: json.dumps(meta).encode()})
        pq.write_table(table, path)

    @classmethod
    def load(cls, path: str | Path) -> AccessStatsCollector:
        """Read a ``.json`` or ``.parquet`` export back into a collector.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            KVTraceFormatError: the file is not a valid export; the message
                names the file and what is wrong.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if path.suffix.lower() == ".parquet":
            return cls._load_parquet(path)
        return cls._load_json(path)

    @classmethod
    def _load_json(cls, path: Path) -> AccessStatsCollector:
        try:
            with path.open("r", encoding="utf-8") as f:
                doc = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            line = getattr(exc, "lineno", None)
            raise KVTraceFormatError(
                f"{path}: not valid JSON ({exc})", path=str(path), line=line
            ) from None
        if not isinstance(doc, dict):
            raise KVTraceFormatError(
                f"{path}: expected a JSON object at the top level", path=str(path)
            )
        if doc.get("version") != FORMAT_VERSION:
            raise KVTraceFormatError(
                f"{path}: field 'version' is {doc.get('version')!r}, expected {FORMAT_VERSION}",
                path=str(path),
                field="version",
            )
        accesses = doc.get("accesses")
        if not isinstance(accesses, dict):
            raise KVTraceFormatError(
                f"{path}: field 'accesses' is missing or not an object",
                path=str(path),
                field="accesses",
            )
        cols = {}
        for name in _ACCESS_COLUMNS:
            col = accesses.get(name)
            if col is None and name not in ("block_id", "timestamp", "is_hit"):
                continue
            if not isinstance(col, list):
                raise KVTraceFormatError(
                    f"{path}: field 'accesses.{name}' is missing or not a list",
                    path=str(path),
                    field=f"accesses.{name}",
                )
            cols[name] = col
        n = len(cols["block_id"])
        for name, col in cols.items():
            if len(col) != n:
                raise KVTraceFormatError(
                    f"{path}: field 'accesses.{name}' has {len(col)} entries, 'accesses.block_id' has {n}",
                    path=str(path),
                    field=f"accesses.{name}",
                )
        windows = doc.get("time_windows")
        window_sizes = None
        if isinstance(windows, dict) and all(
            isinstance(v, dict) and "window_s" in v for v in windows.values()
        ):
            window_sizes = {k: float(v["window_s"]) for k, v in windows.items()}
        kind = doc.get("block_id_type")
        evictions = doc.get("evictions") or {}
        return cls._from_columns(path, cols, kind, window_sizes, evictions)

    @classmethod
    def _load_parquet(cls, path: Path) -> AccessStatsCollector:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise KVTraceFormatError(
                f"{path}: not a readable Parquet file ({exc})", path=str(path)
            ) from None
        raw = (table.schema.metadata or {}).get(_PARQUET_META_KEY)
        meta = {}
        if raw is not None:
            try:
                meta = json.loads(raw)
            except json.JSONDecodeError:
                raise KVTraceFormatError(
                    f"{path}: corrupt access-stats metadata", path=str(path)
                ) from None
        missing = [c for c in ("block_id", "timestamp", "is_hit") if c not in table.column_names]
        if missing:
            raise KVTraceFormatError(
                f"{path}: missing column(s) {', '.join(missing)}", path=str(path), field=missing[0]
            )
        cols = {c: table.column(c).to_pylist() for c in _ACCESS_COLUMNS if c in table.column_names}
        return cls._from_columns(
            path,
            cols,
            meta.get("block_id_type"),
            meta.get("time_windows"),
            meta.get("evictions") or {},
        )

    @classmethod
    def _from_columns(
        cls,
        path: Path,
        cols: dict[str, list],
        kind: str | None,
        window_sizes: dict[str, float] | None,
        evictions: dict[str, list],
    ) -> AccessStatsCollector:
        def restore(ids: list) -> list:
            if kind == "bytes":
                try:
                    return [bytes.fromhex(b) for b in ids]
                except (TypeError, ValueError):
                    raise KVTraceFormatError(
                        f"{path}: block ids are not hex strings", path=str(path), field="block_id"
                    ) from None
            return ids

        block_ids = restore(cols["block_id"])
        bad = next(
            (b for b in block_ids if not isinstance(b, (str, int, bytes)) or isinstance(b, bool)),
            None,
        )
        if bad is not None:
            raise KVTraceFormatError(
                f"{path}: block id {bad!r} is not a string or integer",
                path=str(path),
                field="block_id",
            )
        collector = cls(clock=lambda: 0.0, time_windows=window_sizes)
        try:
            collector.record_many(
                block_ids,
                np.asarray(cols["is_hit"], dtype=bool),
                timestamps=np.asarray(cols["timestamp"], dtype=np.float64),
                request_ids=cols.get("request_id"),
                positions=cols.get("position"),
                tiers=cols.get("tier"),
                size_bytes=cols.get("size_bytes"),
            )
            ev_ids = restore(evictions.get("block_id", []))
            for b, t, reason, h in zip(
                ev_ids,
                evictions.get("timestamp", []),
                evictions.get("reason", []),
                evictions.get("block_hash", []),
            ):
                collector.record_eviction(b, reason, timestamp=float(t), block_hash=h)
        except (TypeError, ValueError) as exc:
            raise KVTraceFormatError(
                f"{path}: bad value in accesses ({exc})", path=str(path)
            ) from None
        return collector


# ---------------------------------------------------------------------- helpers
def _evictions_json(s: dict[str, Any]) -> dict[str, list]:
    keys = s["block_keys"]
    return {
        "block_id": [_id_to_json(keys[b]) for b in s["evict_block"].tolist()],
        "timestamp": s["evict_ts"].tolist(),
        "reason": list(s["evict_reason"]),
        "block_hash": [None if h is None else _id_to_json(h) for h in s["evict_hash"]],
    }


def _to_polars(s: dict[str, Any], pl: Any) -> Any:
    keys = s["block_keys"]
    if _kind_of(keys) == "int":
        labels = pl.Series("block_id", keys, dtype=pl.Int64)
    else:
        labels = pl.Series("block_id", [str(_id_to_json(k)) for k in keys], dtype=pl.String)
    req_labels = pl.Series(
        [str(_id_to_json(k)) for k in s["request_keys"]] + [None], dtype=pl.String
    )
    tier_labels = pl.Series([str(k) for k in s["tier_keys"]] + [None], dtype=pl.String)
    codes = pl.Series("block_code", s["block"], dtype=pl.Int64)
    # -1 (missing) gathers the trailing null of the label series
    req_idx = np.where(s["request"] < 0, len(s["request_keys"]), s["request"])
    tier_idx = np.where(s["tier"] < 0, len(s["tier_keys"]), s["tier"])
    pos = s["position"]
    size = s["size_bytes"]
    return pl.DataFrame(
        [
            pl.Series("timestamp", s["timestamp"], dtype=pl.Float64),
            labels.gather(codes) if len(codes) else labels.clear(),
            codes,
            pl.Series("is_hit", s["is_hit"], dtype=pl.Boolean),
            req_labels.gather(req_idx).alias("request_id"),
            pl.Series("position", pos, dtype=pl.Int64).set(pl.Series(pos < 0), None),
            tier_labels.gather(tier_idx).alias("tier"),
            pl.Series("size_bytes", size, dtype=pl.Int64).set(pl.Series(size < 0), None),
        ]
    )


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {f"p{q}": 0.0 for q in _PERCENTILES}
    return {f"p{q}": float(v) for q, v in zip(_PERCENTILES, np.percentile(values, _PERCENTILES))}


def _summarize(s: dict[str, Any], time_windows: dict[str, float]) -> dict[str, Any]:
    blocks, ts, hits = s["block"], s["timestamp"], s["is_hit"]
    n = len(blocks)
    num_hits = int(hits.sum())
    start = float(ts.min()) if n else 0.0
    end = float(ts.max()) if n else 0.0
    duration = end - start
    unique_blocks = len(np.unique(blocks)) if n else 0
    summary: dict[str, Any] = {
        "total_accesses": n,
        "hits": num_hits,
        "misses": n - num_hits,
        "hit_rate": num_hits / n if n else 0.0,
        "unique_blocks": unique_blocks,
        "unique_requests": len(np.unique(s["request"][s["request"] >= 0])) if n else 0,
        "start_s": start,
        "end_s": end,
        "duration_s": duration,
        "accesses_per_s": n / duration if duration > 0 else 0.0,
    }

    windows = {}
    for name, width in time_windows.items():
        if n:
            idx = ((ts - start) // width).astype(np.int64)
            num = int(idx.max()) + 1
            acc = np.bincount(idx, minlength=num)
            hit = np.bincount(idx, weights=hits, minlength=num).astype(np.int64)
        else:
            num, acc, hit = 0, np.zeros(0, np.int64), np.zeros(0, np.int64)
        rate = np.divide(hit, acc, out=np.zeros(len(acc)), where=acc > 0)
        windows[name] = {
            "window_s": float(width),
            "num_windows": num,
            "start_s": (start + width * np.arange(num)).tolist(),
            "accesses": acc.tolist(),
            "hits": hit.tolist(),
            "hit_rate": rate.tolist(),
        }
    summary["time_windows"] = windows

    prev = previous_access_index(blocks)
    dist = reuse_distances(blocks, prev)
    reused = dist[dist >= 0]
    hist = {"bin_lo": [], "bin_hi": [], "count": []}
    if len(reused):
        # bins [0], [1], [2,3], [4,7], ...
        bin_idx = np.where(
            reused == 0, 0, np.floor(np.log2(np.maximum(reused, 1))).astype(np.int64) + 1
        )
        counts = np.bincount(bin_idx)
        lo = [0] + [2 ** (k - 1) for k in range(1, len(counts))]
        hi = [0] + [2**k - 1 for k in range(1, len(counts))]
        hist = {"bin_lo": lo, "bin_hi": hi, "count": counts.tolist()}
    summary["reuse_distance"] = {
        "count": len(reused),
        "cold": int(n - len(reused)),
        "mean": float(reused.mean()) if len(reused) else 0.0,
        "percentiles": _percentiles(reused),
        "histogram": hist,
    }
    rt = reuse_times(ts, prev)
    rt = rt[~np.isnan(rt)]
    summary["reuse_time_s"] = {
        "count": len(rt),
        "mean": float(rt.mean()) if len(rt) else 0.0,
        "percentiles": _percentiles(rt),
    }

    hottest = []
    if n:
        counts = np.bincount(blocks)
        hit_counts = np.bincount(blocks, weights=hits, minlength=len(counts)).astype(np.int64)
        top = np.argsort(-counts, kind="stable")[:_NUM_HOTTEST]
        hottest = [
            {
                "block_id": _id_to_json(s["block_keys"][b]),
                "accesses": int(counts[b]),
                "hits": int(hit_counts[b]),
            }
            for b in top.tolist()
            if counts[b] > 0
        ]
    summary["hottest_blocks"] = hottest

    by_pos = []
    pos = s["position"]
    has_pos = pos >= 0
    if has_pos.any():
        p = pos[has_pos]
        h = hits[has_pos]
        edges = position_bucket_edges(int(p.max()))
        bucket = np.searchsorted(np.asarray(edges), p, side="right") - 1
        acc = np.bincount(bucket, minlength=len(edges))
        hit = np.bincount(bucket, weights=h, minlength=len(edges)).astype(np.int64)
        for k, lo in enumerate(edges):
            hi = edges[k + 1] - 1 if k + 1 < len(edges) else max(lo, 2 * lo - 1)
            by_pos.append(
                {
                    "bucket": _bucket_label(lo, hi),
                    "position_lo": lo,
                    "position_hi": hi,
                    "accesses": int(acc[k]),
                    "hits": int(hit[k]),
                    "hit_rate": float(hit[k] / acc[k]) if acc[k] else 0.0,
                }
            )
    summary["hit_rate_by_position"] = by_pos

    summary["evictions"] = {
        "total": len(s["evict_reason"]),
        "by_reason": dict(sorted(Counter(s["evict_reason"]).items())),
    }
    return summary
