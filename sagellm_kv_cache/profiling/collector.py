"""Compact collector of KV-block accesses (the recording side).

One access is one fixed-width packed record (43 bytes) appended to a single
``bytearray``; nothing is allocated per event beyond those bytes, and the
buffer is read back as a numpy structured array whose fields are the
columns::

    field        type     meaning
    block        int64    interned block id (code into the block interner's keys)
    timestamp    float64  seconds (collector clock, or the caller's clock)
    request      int64    interned request id, -1 none
    position     int64    block position in the prompt, -1 none
    size_bytes   int64    bytes of the block, -1 none
    tier         int16    interned tier name ("gpu", "cpu"...), -1 none
    is_hit       int8     1 hit, 0 miss

Why one packed buffer and not seven column arrays: a row goes in with one
C call (``struct.pack`` then ``bytearray.extend``), which is atomic, so
:meth:`AccessStatsCollector.record_access` needs no lock. Requests queued by
a pool hook are kept as prompt segments (a block code per row, the rest per
request, :class:`~.batches.PromptSegment`) between the packed chunks, in call
order, and become rows only when read or spilled. Block, request and
tier ids go through one :class:`~.interning.Interner` each, so a block id may
be a ``str`` (``"block_001"``), an ``int`` (pool block ids) or ``bytes``.

A pool hook records whole requests (:meth:`~AccessStatsCollector.record_prompt`)
and eviction batches (:meth:`~AccessStatsCollector.record_evictions`): a call
only queues its ids (one list extension and one small tuple), and queued
batches become records in one vectorised step at the next read. Summaries
live in :mod:`.summary`, files in :mod:`.export`.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KVCacheError, KVInvalidInputError, KVInvalidTypeError
from . import columns, export, records
from .batches import BatchQueue, build
from .interning import Interner, check_id, kind_of
from .records import AccessEvent, BlockId, EvictionEvent
from .spill import SpillStore
from .store import RecordStore
from .summary import summarize

__all__ = ["TIME_WINDOWS", "AccessStatsCollector"]

#: Window sizes of the per-window statistics: name -> seconds.
TIME_WINDOWS: dict[str, float] = {"1s": 1.0, "10s": 10.0, "60s": 60.0}


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


def _bad_record(exc: Exception) -> KVCacheError:
    """The typed error of a field that does not fit its packed column."""
    text = str(exc)
    if "out of range" in text or "format requires" in text:
        return KVInvalidInputError(f"a field does not fit its 64-bit column ({text})")
    return KVInvalidTypeError(f"bad field type ({text}): ids are str/int/bytes, numbers numeric")


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
    :meth:`record_access` calls never interleave fields of two rows and take
    no lock once their ids are known. A lock guards the rest: interning a new
    id, queueing a batch, evictions, snapshots and :meth:`reset`. Analyses
    work on a snapshot.

    Memory: unbounded by default (43 bytes per access, 8 per block of a queued
    request, about 40 per eviction).
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
        spill = SpillStore(ROW_DTYPE, spill_dir) if limit is not None else None
        self._bounded = spill is not None
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
        self._origin = clock()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._blocks = Interner(self._lock)
        self._requests = Interner(self._lock)
        self._tiers = Interner(self._lock)
        # record_access's lookups, bound once (the dicts are only ever cleared in place)
        self._block_code = self._blocks.codes_map.get
        self._request_code = self._requests.codes_map.get
        self._tier_code = self._tiers.codes_map.get
        # the interned keys (code -> id), cleared in place by reset()
        self._block_keys = self._blocks.keys
        self._request_keys = self._requests.keys
        self._tier_keys = self._tiers.keys
        self._store = RecordStore(ROW_DTYPE, self._lock, spill, limit or 0)
        # the open packed rows and the eviction columns (containers cleared in place)
        self._rows = self._store.rows
        self._append_row = self._rows.extend
        self._ev_block, self._ev_ts = self._store.ev_block, self._store.ev_ts
        self._ev_reason, self._ev_hash = self._store.ev_reason, self._store.ev_hash
        # record_prompt / record_evictions calls not yet made into records
        self._pending = BatchQueue(self._lock)
        self._queued = self._pending.meta  # truthy while calls are queued
        self._spill_at = ((limit or 0) + 1) * ROW_DTYPE.itemsize

    # ------------------------------------------------------------------ recording
    def reset(self) -> None:
        """Drop every recorded access and eviction and restart the clock."""
        self._pending.clear()
        self._store.clear()
        with self._lock:
            self._origin = self._clock()
            for interner in (self._blocks, self._requests, self._tiers):
                interner.clear()

    @property
    def records_in_memory(self) -> int:
        """Access + eviction records held in memory now (queued calls not counted)."""
        return self._store.records_in_memory

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
        if self._queued:  # rows keep call order
            self._flush()
        if timestamp is None:
            timestamp = self._clock() - self._origin
        pos = -1 if position is None else position
        size = -1 if size_bytes is None else size_bytes
        try:
            # fast path: every id seen before; nothing changes until the row packs
            code = self._block_code(block_id)
            req = -1 if request_id is None else self._request_code(request_id)
            tier_code = -1 if tier is None else self._tier_code(tier)
            if code is None or req is None or tier_code is None:
                # a new id: check every field (a trial pack) before interning anything
                _ROW.pack(0, timestamp, 0, pos, size, 0, 1 if is_hit else 0)
                check_id(block_id, "block_id")
                if request_id is not None:
                    check_id(request_id, "request_id")
                if tier is not None and not isinstance(tier, str):
                    raise KVInvalidTypeError(f"tier must be a str, got {type(tier).__name__}")
                code = self._blocks.code(block_id)
                req = -1 if request_id is None else self._requests.code(request_id)
                tier_code = -1 if tier is None else self._tiers.code(tier)
            row = _ROW.pack(code, timestamp, req, pos, size, tier_code, 1 if is_hit else 0)
        except (TypeError, struct.error) as exc:
            raise _bad_record(exc) from None
        self._append_row(row)
        if self._bounded and len(self._rows) >= self._spill_at:
            self._store.maybe_spill()

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
        if self._queued:
            self._flush()
        rows = columns.build_rows(
            ROW_DTYPE,
            block_ids,
            is_hit,
            self._clock() - self._origin if timestamps is None else timestamps,
            request_ids,
            positions,
            tiers,
            size_bytes,
            (self._blocks, self._requests, self._tiers),
        )
        self._rows.extend(rows.tobytes())
        self._store.maybe_spill()

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

        The call only queues the request (O(1) Python work however long the
        prompt: its ids are copied by one list extension); queued requests
        become rows in one vectorised step when anything reads the collector
        or records through another method, or every 4096 queued calls, so the
        order of rows is the order of calls.
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
            self._queue(block_ids, int(num_hit_blocks), timestamp, request_id, tier, size_bytes)

    def record_evictions(
        self,
        block_ids: Sequence[BlockId],
        reason: str = "capacity",
        *,
        timestamp: float | None = None,
        block_hashes: Sequence[bytes | int | None] | None = None,
    ) -> None:
        """:meth:`record_eviction` for many blocks evicted together.

        Queued like :meth:`record_prompt` (O(1) Python work per call) and
        recorded at the next read. A hash that is not ``bytes``/``int`` is
        stored as None.
        """
        if not len(block_ids):
            return
        if block_hashes is not None and len(block_hashes) != len(block_ids):
            raise KVInvalidInputError(
                f"block_hashes has {len(block_hashes)} entries for {len(block_ids)} block ids"
            )
        if timestamp is None:
            timestamp = self._clock() - self._origin
        self._queue(block_ids, -1, float(timestamp), str(reason), None, None, block_hashes)

    def _queue(
        self,
        block_ids: Sequence[BlockId],
        hits: int,
        timestamp: float,
        request_or_reason: Any,
        tier: str | None,
        size_bytes: int | None,
        block_hashes: Sequence[Any] | None = None,
    ) -> None:
        """Queue one batch whose fields are already checked: a prompt (``hits`` >= 0) or
        an eviction batch (``hits`` -1, its reason where a prompt has its request id).
        :class:`AccessStatsHook` pushes onto ``_pending`` itself, the same way: the
        pool's values are valid by construction."""
        if self._pending.push(
            block_ids, hits, timestamp, request_or_reason, tier, size_bytes, block_hashes
        ):
            self._flush()

    def _flush(self) -> None:
        """Turn the queued calls into records (call order kept), then spill if over the bound."""
        with self._flush_lock:  # concurrent flushes append their records in queue order
            self._flush_locked()
        self._store.maybe_spill()

    def _flush_locked(self) -> None:
        rec = build(self._pending.take(), self._blocks, self._requests, self._tiers)
        if rec.segment is not None:
            self._store.add_segment(rec.segment)
        if rec.ev_codes is not None and rec.ev_ts is not None:
            self._store.add_evictions(rec.ev_codes, rec.ev_ts, rec.ev_reasons, rec.ev_hashes)

    def record_eviction(
        self,
        block_id: BlockId,
        reason: str = "capacity",
        *,
        timestamp: float | None = None,
        block_hash: bytes | int | None = None,
    ) -> None:
        """Record that ``block_id`` was evicted (for ``reason``: "capacity", "explicit", ...)."""
        if self._queued:
            self._flush()
        check_id(block_id, "block_id")
        if timestamp is None:
            timestamp = self._clock() - self._origin
        try:
            timestamp = float(timestamp)
        except (TypeError, ValueError):
            raise KVInvalidTypeError(f"timestamp must be a number, got {timestamp!r}") from None
        code = self._blocks.code(block_id)
        self._store.add_eviction(code, timestamp, str(reason), block_hash)
        self._store.maybe_spill()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        if self._queued:
            self._flush()
        return self._store.num_rows

    @property
    def num_evictions(self) -> int:
        """Number of recorded evictions."""
        if self._queued:
            self._flush()
        return self._store.num_evictions

    @property
    def num_queued(self) -> int:
        """Calls of :meth:`record_prompt` / :meth:`record_evictions` not yet turned into records."""
        return len(self._pending)

    @property
    def spill_directory(self) -> Path | None:
        """The folder spilled records are in (None: unbounded, or nothing spilled yet)."""
        spill = self._store.spill
        return None if spill is None else spill.directory

    def snapshot(self) -> dict[str, Any]:
        """Every record as numpy columns, plus the interned keys, taken under the lock.

        Returns:
            ``block``, ``timestamp``, ``is_hit``, ``request``, ``position``,
            ``tier``, ``size_bytes`` (arrays; codes into the key lists, -1
            missing), ``block_keys``, ``request_keys``, ``tier_keys`` (lists),
            ``evict_block``, ``evict_ts`` (arrays), ``evict_reason``,
            ``evict_hash`` (lists). Spilled records come first.
        """
        if self._queued:
            self._flush()
        with self._lock:
            keys = (list(self._block_keys), list(self._request_keys), list(self._tier_keys))
        rows, evictions = self._store.read()
        return records.snapshot_columns(rows, keys, evictions)

    def iter_events(self) -> Iterator[AccessEvent]:
        """Yield every access as an :class:`AccessEvent` (slow; for small collections and tests)."""
        return records.iter_access_events(self.snapshot())

    def iter_evictions(self) -> Iterator[EvictionEvent]:
        """Yield every recorded eviction as an :class:`EvictionEvent`."""
        return records.iter_eviction_events(self.snapshot())

    @property
    def block_id_type(self) -> str:
        """``"int"``, ``"str"``, ``"bytes"`` or ``"mixed"``: the kind of the block ids seen."""
        if self._queued:
            self._flush()
        with self._lock:
            keys = list(self._block_keys)
        return kind_of(keys)

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
        return summarize(self.snapshot(), self.time_windows)

    # ------------------------------------------------------------------ tables
    def to_polars(self) -> Any:
        """The event table as a ``polars.DataFrame``.

        Columns: ``timestamp`` (Float64, s), ``block_id`` (Int64 when every
        block id is an int, else String; bytes as hex), ``block_code``
        (Int64, first-seen order), ``is_hit`` (Boolean), ``request_id``
        (String, null), ``position`` (Int64, null), ``tier`` (String, null),
        ``size_bytes`` (Int64, null).
        """
        return export.to_polars(self.snapshot())

    def to_pandas(self) -> Any:
        """The event table of :meth:`to_polars` as a ``pandas.DataFrame``.

        ``position`` and ``size_bytes`` are pandas nullable ``Int64``;
        ``request_id`` and ``tier`` hold ``None``/NA where missing.
        """
        return export.to_pandas(self.snapshot())

    def evictions_to_polars(self) -> Any:
        """Evictions as a ``polars.DataFrame``: ``timestamp``, ``block_id``, ``reason``, ``block_hash``."""
        return export.evictions_to_polars(self.snapshot())

    # ------------------------------------------------------------------ export / load
    def export_stats(self, path: str | Path) -> Path:
        """Write accesses, evictions and the summary to ``path``.

        The suffix picks the format: ``.json`` or ``.parquet`` (layouts in
        :mod:`sagellm_kv_cache.profiling.export`).

        Returns:
            The path written.

        Raises:
            KVInvalidInputError: the suffix is neither ``.json`` nor ``.parquet``.
        """
        return export.export_stats(self.snapshot(), self.time_windows, path)

    def to_json_dict(self) -> dict[str, Any]:
        """The document :meth:`export_stats` writes for ``.json``."""
        return export.to_json_dict(self.snapshot(), self.time_windows)

    @classmethod
    def load(cls, path: str | Path) -> AccessStatsCollector:
        """Read a ``.json`` or ``.parquet`` export back into a collector.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            KVTraceFormatError: the file is not a valid export; the message
                names the file and what is wrong.
        """
        collector: AccessStatsCollector = export.load(cls, path)
        return collector
