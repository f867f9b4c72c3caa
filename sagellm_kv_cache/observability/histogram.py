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

    ``values`` buffers single observations. A batch sharing one end time goes
    in through :meth:`add_batch`: when all its start times are equal (blocks
    cached, hit or released together, the common case) it is one
    ``end, start, count`` in ``runs``; otherwise its start times go to
    ``starts`` with one ``end, count`` in ``marks``. ``runs`` and ``marks``
    are flat lists (three and two entries a batch): a tuple kept per batch
    would be a container the garbage collector tracks, and thousands of them
    made its passes run on the pool's hot path. With guards (one per
    start) a start counts only if it is ``>=`` its guard. ``fold`` counts
    everything with one numpy pass and empties the buffers in place. NaN
    observations (unknown start) are dropped. Not thread-safe: the owner
    calls everything under one lock (the pool's).
    """

    __slots__ = ("bounds", "counts", "guards", "marks", "runs", "starts", "sum", "values")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # last: above every bound
        self.sum = 0.0
        self.values: list[float] = []
        self.starts: list[float] = []
        self.marks: list[float] = []  # end, count per batch
        self.guards: list[float] = []
        self.runs: list[float] = []  # end, start, count per batch

    def __len__(self) -> int:
        return len(self.values) + len(self.starts) + len(self.runs) // 3

    def add_batch(
        self, end: float, starts: Sequence[float], guards: Sequence[float] | None = None
    ) -> None:
        """Observe ``end - start`` for each start (with ``guards``: only where
        ``start >= guard``). ``starts``/``guards`` are lists or tuples."""
        n = len(starts)
        if not n:
            return
        s0 = starts[0]
        if starts.count(s0) == n and (guards is None or guards.count(guards[0]) == n):
            if guards is None or s0 >= guards[0]:
                self.runs.extend((end, s0, n))  # the tuple dies here
            return
        self.starts.extend(starts)
        self.marks.extend((end, n))
        if guards is not None:
            self.guards.extend(guards)

    def fold(self) -> None:
        if self.runs:
            runs = np.array(self.runs, dtype=np.float64)
            r_end, r_start, r_count = runs[0::3], runs[1::3], runs[2::3]
            self.runs.clear()
            r_values = r_end - r_start
            ok = ~np.isnan(r_values)
            r_values, r_count = r_values[ok], r_count[ok]
            idx = np.searchsorted(self.bounds, r_values, side="left")
            self.counts += np.bincount(idx, weights=r_count, minlength=len(self.counts)).astype(
                np.int64
            )
            self.sum += float((r_values * r_count).sum())
        if not self.values and not self.starts:
            return
        values = np.array(self.values, dtype=np.float64)
        if self.starts:
            marks = self.marks
            starts = np.array(self.starts, dtype=np.float64)
            ends = np.array(marks[0::2], dtype=np.float64)
            batch = np.repeat(ends, np.array(marks[1::2], dtype=np.int64)) - starts
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
