"""Sweep speed: the serial executor vs the process executor, on the bundled Mooncake trace.

One sweep = ``--jobs`` LRU replays at capacities spaced evenly on a log scale
from 1,000 to 30,000 blocks (no bound rows), the trace given as a path, so
both executors include reading the JSONL file once in this process. The
process executor's time includes starting its worker processes (forked
from a forkserver that preloads polars and the library) and shipping the
table; the first process sweep of an interpreter also starts
the forkserver and is reported on its own row.
Both produce identical rows (checked here). ``sum_job_s`` adds the jobs' wall
times where they ran and ``sum_job_cpu_s`` their CPU times: equal CPU with
larger wall time in the workers means they waited for a core (other load).

    python benchmarks/bench_sweep.py [--jobs 8] [--workers 2] [--repeat 3] [--tile 1]

``--tile K`` replays the trace K times back to back (K times longer jobs),
to show how the fixed start-up cost amortises.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from _util import parse_args, print_table, write_json


def _tiled_trace(k: int) -> Path:
    """The bundled trace repeated ``k`` times, timestamps shifted so they stay sorted."""
    import json

    from traces import DEFAULT_TRACE

    lines = [json.loads(x) for x in DEFAULT_TRACE.read_text().splitlines() if x.strip()]
    span = lines[-1]["timestamp"] + 1
    out = Path(tempfile.mkdtemp(prefix="bench-sweep-")) / f"mooncake_x{k}.jsonl"
    with out.open("w") as fh:
        for i in range(k):
            for rec in lines:
                fh.write(json.dumps({**rec, "timestamp": rec["timestamp"] + i * span}) + "\n")
    return out


def main() -> None:
    import numpy as np

    from sim.sweep import sweep
    from traces import DEFAULT_TRACE

    args = parse_args(__doc__, jobs=8, workers=2, repeat=3, tile=1)
    trace = DEFAULT_TRACE if args.tile == 1 else _tiled_trace(args.tile)
    caps = sorted({int(c + 0.5) for c in np.geomspace(1000, 30000, args.jobs)})
    kw = {"bounds": False, "progress": False}

    res, frames = {}, {}

    def timed(**extra):
        t0 = time.perf_counter()
        df = sweep([trace], caps, ["lru"], **kw, **extra)
        return time.perf_counter() - t0, df

    proc = {"executor": "process", "workers": args.workers}
    # the first process sweep of this interpreter also starts multiprocessing's forkserver
    cold_s, df = timed(**proc)
    res["process, first sweep"] = {
        "seconds": cold_s,
        "sum_of_job_seconds": float(df["seconds"].sum()),
        "sum_of_job_cpu_seconds": float(df["cpu_seconds"].sum()),
    }
    for name, extra in (("serial", {"executor": "serial"}), (f"process x{args.workers}", proc)):
        best, replay_s, cpu_s = float("inf"), 0.0, 0.0
        for _ in range(args.repeat):
            wall, df = timed(**extra)
            if wall < best:
                best, replay_s = wall, float(df["seconds"].sum())
                cpu_s = float(df["cpu_seconds"].sum())
        frames[name] = df.drop("seconds", "cpu_seconds")
        res[name] = {
            "seconds": best,
            "sum_of_job_seconds": replay_s,
            "sum_of_job_cpu_seconds": cpu_s,
        }
    names = list(frames)
    assert frames[names[0]].equals(frames[names[1]]), "executors disagree"
    speedup = res[names[0]]["seconds"] / res[names[1]]["seconds"]
    cold_speedup = res["serial"]["seconds"] / cold_s
    rows = [
        {
            "executor": n,
            "jobs": len(caps),
            "wall_s": r["seconds"],
            "sum_job_s": r["sum_of_job_seconds"],
            "sum_job_cpu_s": r["sum_of_job_cpu_seconds"],
            "speedup": res["serial"]["seconds"] / r["seconds"],
        }
        for n, r in res.items()
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print_table(
        rows,
        f"sweep of {len(caps)} LRU replays, Mooncake trace x{args.tile} "
        f"(best of {args.repeat}; load avg {load:.2f} on {os.cpu_count()} cores)",
    )
    print(
        f"\nprocess / serial speedup: {speedup:.2f} warm, {cold_speedup:.2f} first sweep"
        " (goal >= 1.6 with 2 free cores)"
    )
    write_json(
        "sweep" if args.tile == 1 else f"sweep_x{args.tile}",
        {
            "trace_tile": args.tile,
            "capacities_blocks": caps,
            "workers": args.workers,
            "results": res,
            "speedup": speedup,
            "speedup_first_sweep": cold_speedup,
            "load_avg_1min_before_end": load,
        },
    )


if __name__ == "__main__":
    main()
