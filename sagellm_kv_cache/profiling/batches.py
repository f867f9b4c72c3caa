"""The queue behind ``record_prompt`` / ``record_evictions``: whole requests and
eviction batches, turned into records in one vectorised step.

A pool hook reports one request's blocks per lookup and one batch per
eviction. Recording them one access at a time would cost a Python call per
block; instead a call appends its ids to one flat list (a C-level copy) and
six fields describing the batch to another::

    ids      [7, 3, 12, 40, 41 | 9, 8 | ...]        every queued id, call order
    meta     [5, 3, t0, "r1", "gpu", 64,            per batch: n, hits (-1: evictions),
              2, -1, t1, "capacity", None, None]    time, request or reason, tier, size
    hashes   [h9, h8, ...]                          evicted blocks' hashes, in order

Flat lists and no object kept per call: a stored tuple per batch is a
container the garbage collector tracks, and thousands of them queued made
the collector's generational passes run (and walk the caller's heap) where a
pool without the hook runs none.

:func:`build` interns every queued id at once (the first-seen order is the
call order, as one-by-one recording would give), keeps the prompts as one
:class:`PromptSegment` (codes per row, the rest per request; rows are made
when read) and the evictions as columns made with list and array extensions.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from typing import Any

import numpy as np

from .interning import Interner

__all__ = ["BatchQueue", "PromptSegment", "Records", "build"]

_HASH_TYPES = frozenset((bytes, int, type(None)))
#: Queued batches that make :meth:`BatchQueue.push` ask for a flush.
FLUSH_AT = 4096
#: Fields per batch in :attr:`BatchQueue.meta`.
META = 6
_FLUSH_META = FLUSH_AT * META

#: What :meth:`BatchQueue.take` returns: ids, meta (``META`` fields a batch), hashes.
Taken = tuple[list[Any], list[Any], list[Any]]


class BatchQueue:
    """Queued prompt and eviction batches (see the module doc); thread-safe under ``lock``."""

    __slots__ = ("hashes", "ids", "lock", "meta")

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.ids: list[Any] = []
        self.meta: list[Any] = []
        self.hashes: list[Any] = []

    def __len__(self) -> int:
        return len(self.meta) // META

    def push(
        self, ids: Any, hits: int, timestamp: float, a: Any, b: Any, c: Any, hashes: Any = None
    ) -> bool:
        """Queue one batch (``hits`` -1 for evictions, whose ``hashes`` are None or one
        per id); True when the queue is full enough to be flushed."""
        with self.lock:
            # a list extension copies references at C speed; an int64 array's
            # extend from a list converts item by item and costs 3-4x more here
            self.ids.extend(ids)
            if hits < 0:
                self.hashes.extend(repeat(None, len(ids)) if hashes is None else hashes)
            meta = self.meta
            meta.extend((len(ids), hits, timestamp, a, b, c))  # the tuple dies here
            return len(meta) >= _FLUSH_META

    def clear(self) -> None:
        with self.lock:
            self.ids, self.hashes = [], []
            self.meta.clear()  # in place: the owner holds this list to test for a queue

    def take(self) -> Taken:
        """Everything queued (ids, meta, hashes), leaving the queue empty."""
        with self.lock:
            taken = self.ids, self.meta.copy(), self.hashes
            self.ids, self.hashes = [], []
            self.meta.clear()  # in place: the owner holds this list to test for a queue
        return taken


@dataclass(slots=True)
class PromptSegment:
    """Queued prompts as the collector keeps them: one block code per row, the rest per
    request. Rows (positions, hit flags, repeated request fields) are made only when
    someone reads them (:meth:`rows`), so recording a request costs no per-row work
    beyond its codes."""

    codes: np.ndarray  # int64, one per row
    lens: np.ndarray  # int64, rows per request
    hits: np.ndarray  # int64, leading hit rows per request
    ts: np.ndarray  # float64
    requests: np.ndarray  # int64 codes, -1 none
    tiers: np.ndarray  # int64 codes, -1 none
    sizes: np.ndarray  # int64 bytes, -1 none

    @property
    def num_rows(self) -> int:
        return len(self.codes)

    def rows(self, row_dtype: np.dtype) -> np.ndarray:
        """The segment's records as a ``row_dtype`` array, in call order."""
        lens = self.lens
        positions = np.arange(len(self.codes), dtype=np.int64) - np.repeat(
            np.cumsum(lens) - lens, lens
        )
        rows = np.empty(len(self.codes), dtype=row_dtype)
        rows["block"] = self.codes
        rows["timestamp"] = np.repeat(self.ts, lens)
        rows["request"] = _per_batch(self.requests, lens)
        rows["position"] = positions
        rows["size_bytes"] = _per_batch(self.sizes, lens)
        rows["tier"] = _per_batch(self.tiers, lens)
        rows["is_hit"] = positions < np.repeat(self.hits, lens)
        return rows


@dataclass(slots=True)
class Records:
    """What :func:`build` makes of a queue: a prompt segment and eviction columns."""

    segment: PromptSegment | None = None
    ev_codes: np.ndarray | None = None
    ev_ts: np.ndarray | None = None
    ev_reasons: list[str] = field(default_factory=list)
    ev_hashes: list[Any] = field(default_factory=list)


def _per_batch(arr: np.ndarray, lens: np.ndarray) -> Any:
    """One value per request repeated over its rows; a scalar when all are equal
    (a pool hook's request / tier / size columns: one broadcast write)."""
    if (arr == arr[0]).all():
        return arr[0]
    return np.repeat(arr, lens)


def build(taken: Taken, blocks: Interner, requests: Interner, tiers: Interner) -> Records:
    """Intern the queued ids and build the records."""
    ids, meta, hashes = taken
    out = Records()
    if not meta:
        return out
    codes = blocks.codes(ids)
    lens_t, hits_t, ts_t, a_t, b_t, c_t = (meta[i::META] for i in range(META))
    lens = np.array(lens_t, dtype=np.int64)
    hits = np.array(hits_t, dtype=np.int64)
    ts = np.array(ts_t, dtype=np.float64)
    is_prompt = hits >= 0
    if is_prompt.all():
        out.segment = _segment(codes, lens, hits, ts, a_t, b_t, c_t, requests, tiers)
        return out
    mask = np.repeat(is_prompt, lens)
    if is_prompt.any():
        keep = is_prompt.tolist()
        req_p, tier_p, size_p = (tuple(compress(col, keep)) for col in (a_t, b_t, c_t))
        out.segment = _segment(
            codes[mask],
            lens[is_prompt],
            hits[is_prompt],
            ts[is_prompt],
            req_p,
            tier_p,
            size_p,
            requests,
            tiers,
        )
    ev = ~is_prompt
    ev_lens = lens[ev]
    out.ev_codes = codes[~mask]
    out.ev_ts = np.repeat(ts[ev], ev_lens)
    reasons = [r for r, e in zip(a_t, ev.tolist()) if e]
    out.ev_reasons = list(chain.from_iterable(map(repeat, reasons, ev_lens.tolist())))
    if not set(map(type, hashes)) <= _HASH_TYPES:  # rare: some other hash type
        hashes = [h if isinstance(h, (bytes, int)) else None for h in hashes]
    out.ev_hashes = hashes
    return out


def _segment(
    codes: np.ndarray,
    lens: np.ndarray,
    hits: np.ndarray,
    ts: np.ndarray,
    requests: Sequence[Any],
    tiers: Sequence[Any],
    sizes: Sequence[Any],
    request_codes: Interner,
    tier_codes: Interner,
) -> PromptSegment:
    n = len(lens)
    return PromptSegment(
        codes=np.ascontiguousarray(codes, dtype=np.int64),
        lens=lens,
        hits=hits,
        ts=ts,
        requests=request_codes.column(requests, n),
        tiers=tier_codes.column(tiers, n),
        sizes=np.array([-1 if x is None else x for x in sizes], dtype=np.int64),
    )
