"""A Prometheus histogram of seconds that the hot path feeds with plain list appends.

``MetricsHook`` buffers observations (or the start times of a batch sharing
one end) in Python lists and the histogram counts them into buckets in one
numpy pass when folded (at a scrape, or when a buffer grows past a bound).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from prometheus_client.utils import floatToGoString

__all__ = ["DEFAULT_SECONDS_BUCKETS", "SecondsHistogram"]

#: Upper bounds (seconds) of the lifetime / idle / reuse-gap histograms: from
#: 1 ms (back-to-back requests) to a day (a simulator replaying a day's trace).
DEFAULT_SECONDS_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    86400.0,
)


class SecondsHistogram:
    """Bucket counts plus buffered observations not yet counted.

    ``values`` buffers single observations. A batch sharing one end time is
    buffered as its start times in ``starts`` and one ``(end, count)`` in
    ``marks``; when ``guards`` is used (one per start), a start counts only
    if it is ``>=`` its guard. The owner extends these lists directly with
    C-level ``map`` over its per-block lists (no Python work per block);
    ``fold`` counts them with one numpy pass and empties them in place, so
    held references stay valid. NaN observations (unknown start) are
    dropped. Not thread-safe: the owner calls everything under one lock (the
    pool's).
    """

    __slots__ = ("bounds", "counts", "guards", "marks", "starts", "sum", "values")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # last: above every bound
        self.sum = 0.0
        self.values: list[float] = []
        self.starts: list[float] = []
        self.marks: list[tuple[float, int]] = []
        self.guards: list[float] = []

    def __len__(self) -> int:
        return len(self.values) + len(self.starts)

    def fold(self) -> None:
        if not self.values and not self.starts:
            return
        values = np.array(self.values, dtype=np.float64)
        if self.starts:
            ends, counts = zip(*self.marks)
            starts = np.array(self.starts, dtype=np.float64)
            batch = np.repeat(np.array(ends, dtype=np.float64), counts) - starts
            if self.guards:
                batch = batch[starts >= np.array(self.guards, dtype=np.float64)]
            values = np.concatenate([values, batch])
        values = values[~np.isnan(values)]
        # side="left": a value equal to a bound counts in that bound's bucket (le)
        idx = np.searchsorted(self.bounds, values, side="left")
        self.counts += np.bincount(idx, minlength=len(self.counts))
        self.sum += float(values.sum())
        self.values.clear()
        self.starts.clear()
        self.marks.clear()
        self.guards.clear()

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(le, count)`` buckets ending with ``+Inf``, and the sum."""
        self.fold()
        cum = np.cumsum(self.counts).tolist()
        buckets = [(floatToGoString(b), c) for b, c in zip(self.bounds.tolist(), cum)]
        buckets.append(("+Inf", cum[-1]))
        return buckets, self.sum
