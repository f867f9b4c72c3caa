"""AccessStatsCollector benchmark: record_access calls per second, and summary cost.

Measures, best of 3:

* ``record_access`` in a tight loop: str ids with an explicit timestamp
  (trace replay), str ids with the default clock (the seed snippet), int ids
  with every optional field (pool hooks);
* ``record_many`` (one call per 64-block request);
* ``get_stats_summary`` and ``to_polars`` on the collected events.

Goal: >= 1M ``record_access`` calls/s. Never pass/fail; writes
``benchmarks/results/profiling.json``.

    python benchmarks/bench_profiling.py [--calls 1000000]
"""

from __future__ import annotations

import time

import numpy as np
from _util import best_of, parse_args, print_table, write_json

from sagellm_kv_cache.profiling import AccessStatsCollector


def main() -> None:
    args = parse_args(__doc__, calls=(1_000_000, "record_access calls per run"))
    n = args.calls
    str_ids = [f"block_{i:04d}" for i in range(4096)] * (n // 4096 + 1)
    str_ids = str_ids[:n]
    int_ids = list(range(n))
    c = AccessStatsCollector()

    def str_with_ts() -> None:
        c.reset()
        record = c.record_access
        for b in str_ids:
            record(b, True, timestamp=1.0)

    def str_default_clock() -> None:
        c.reset()
        record = c.record_access
        for b in str_ids:
            record(b, False)

    def int_all_fields() -> None:
        c.reset()
        record = c.record_access
        for b in int_ids:
            record(
                b & 4095,
                True,
                timestamp=2.0,
                request_id="req-1",
                position=b & 63,
                tier="gpu",
                size_bytes=4096,
            )

    blocks = np.arange(64, dtype=np.int64)
    hits = blocks < 32

    def many_per_request() -> None:
        c.reset()
        for r in range(n // 64):
            c.record_many(
                blocks + (r & 63) * 64, hits, timestamps=float(r), request_ids=r, positions=blocks
            )

    rows = []
    for name, fn, count in [
        ("record_access(str, timestamp=t)", str_with_ts, n),
        ("record_access(str) default clock", str_default_clock, n),
        ("record_access(int, all fields)", int_all_fields, n),
        ("record_many (64 blocks per call)", many_per_request, n // 64 * 64),
    ]:
        seconds = best_of(fn)
        rows.append(
            {"case": name, "accesses": count, "seconds": seconds, "accesses_per_s": count / seconds}
        )
    print_table(rows, f"AccessStatsCollector: {n:,} accesses")

    int_all_fields()
    t0 = time.perf_counter()
    c.get_stats_summary()
    summary_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    c.to_polars()
    polars_s = time.perf_counter() - t0
    analysis = [
        {"step": "get_stats_summary", "events": len(c), "seconds": summary_s},
        {"step": "to_polars", "events": len(c), "seconds": polars_s},
    ]
    print_table(analysis, "Analysis of the collected events")
    write_json("profiling", {"calls": n, "record": rows, "analysis": analysis})


if __name__ == "__main__":
    main()
