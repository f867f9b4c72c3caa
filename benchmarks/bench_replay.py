"""Replay speed on the bundled Mooncake trace: sequential next to a bare loop, and concurrent.

The first two include reading the JSONL file. The bare loop replays the same
semantics (full blocks only, leading-run hits, tail-first LRU, one entry per
hash) with a single OrderedDict and no validation; ours reads the trace
through the validating reader and replays it through the library's
BlockPool.

The second table replays the already-read table in each mode: sequential,
and concurrent (``sim.engine.replay_concurrent``: event loop on a simulated
clock, default cost model, no sequence limit) in requests per second of wall
time, with the concurrent run's simulated makespan and queueing.

With ``--baseline-rev REV`` a third table compares this tree with the tree at
``REV`` (a ``git worktree`` of it, removed afterwards): each round replays the
read table once per mode (sequential, concurrent) in a fresh subprocess per
tree, trees interleaved, CPU time of the process; results are checked equal
request for request. ``c637cb7~1`` is the tree before the event engine
(``sim/core.py``), whose goal was engine / baseline <= 1.15 in each mode.

    python benchmarks/bench_replay.py [--capacity 10000] [--repeat 3] [--baseline-rev REV]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict

from _util import ROOT, parse_args, print_table, run_worker, worktree, write_json


def bare_loop(path, cap: int) -> tuple[float, int]:
    od: OrderedDict = OrderedDict()
    hit_blocks = total = 0
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            n = r["input_length"] // 512
            hs = r["hash_ids"][:n]
            k = 0
            for h in hs:
                if h in od:
                    k += 1
                else:
                    break
            for h in hs[:k]:
                del od[h]
            while len(od) + n > cap and od:
                od.popitem(last=False)
            for h in reversed(hs):
                od[h] = None
            hit_blocks += k
            total += n
    return hit_blocks / total, total


def ours(path, cap: int) -> tuple[float, int]:
    from sim.replay import replay_sequential
    from traces import read_trace

    r = replay_sequential(read_trace(path), cap)
    return r.block_hit_ratio, r.full_blocks


def main() -> None:
    from traces import DEFAULT_TRACE

    args = parse_args(
        __doc__,
        capacity=10_000,
        repeat=3,
        baseline_rev=(None, "a git revision to measure against (see above)"),
        worker=(False, argparse.SUPPRESS),
    )
    if args.worker:
        print(json.dumps(replay_once(args.capacity)))
        return
    rows, res = [], {}
    for name, fn in (("bare OrderedDict loop", bare_loop), ("sagellm-kv-cache replay", ours)):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ratio, blocks = fn(DEFAULT_TRACE, args.capacity)
            best = min(best, time.perf_counter() - t0)
        res[name] = {"seconds": best, "blocks_per_s": blocks / best, "block_hit_ratio": ratio}
        rows.append(
            {
                "implementation": name,
                "seconds": best,
                "Mblocks_per_s": blocks / best / 1e6,
                "block_hit_ratio": round(ratio, 4),
            }
        )
    speed = (
        res["sagellm-kv-cache replay"]["blocks_per_s"]
        / res["bare OrderedDict loop"]["blocks_per_s"]
    )
    print_table(
        rows,
        f"sequential LRU replay, Mooncake synthetic trace, {args.capacity:,} blocks (JSON parsing included)",
    )
    print(f"\nours / bare speed: {speed:.2f} (goal >= 0.5)")
    payload = {
        "capacity_blocks": args.capacity,
        "results": res,
        "ours_over_bare_speed": speed,
        "modes": by_mode(args.capacity, args.repeat),
    }
    if args.baseline_rev:
        payload["baseline_rev"] = args.baseline_rev
        payload["engine_vs_baseline"] = against_rev(args.baseline_rev, args.capacity, args.repeat)
    write_json("replay", payload)


def replay_once(capacity: int) -> dict:
    """The worker of :func:`against_rev`: each mode once on the bundled trace, in CPU
    seconds of this process, with what the replays returned per request."""
    import numpy as np

    import sagellm_kv_cache
    from sim.engine import replay_concurrent
    from sim.replay import replay_sequential
    from traces import DEFAULT_TRACE, read_trace

    table = read_trace(DEFAULT_TRACE)
    out: dict = {"library": sagellm_kv_cache.__file__, "seconds": {}, "records": {}}
    runs = {
        "sequential": lambda t=table: replay_sequential(t, capacity),
        "concurrent": lambda t=table: replay_concurrent(t, capacity=capacity, progress=False),
    }
    # warm-up on a few requests: what a replay imports lazily is imported (and, where
    # bytecode is not cached, e.g. a fresh worktree under PYTHONDONTWRITEBYTECODE,
    # compiled) before the clock starts, in both trees alike
    for fn in runs.values():
        fn(table.head(50))
    for mode, fn in runs.items():
        t0 = time.process_time()
        r = fn()
        out["seconds"][mode] = time.process_time() - t0
        rec = r["records"] if isinstance(r, dict) else r.records
        cols = ("hit_blocks", "ttft_s") if mode == "concurrent" else ("hit_blocks",)
        out["records"][mode] = {c: np.asarray(rec[c]).tolist() for c in cols}
    return out


def against_rev(rev: str, capacity: int, repeat: int) -> dict:
    """This tree ("engine") against the tree at ``rev`` ("baseline"), each round one
    fresh subprocess per tree, trees interleaved so load from other processes hits
    both alike; best CPU time per mode. Raises if the replays differ."""
    argv = ["--worker", "--capacity", str(capacity)]
    best: dict = {}
    with worktree(rev) as base:
        for i in range(max(repeat, 1)):
            for side, src in (("baseline", base), ("engine", ROOT)):
                got = run_worker(__file__, src, argv)
                if not got["library"].startswith(str(src)):
                    raise RuntimeError(f"{side} imported {got['library']}, not {src}")
                if i == 0:
                    best.setdefault("records", []).append(got["records"])
                for mode, sec in got["seconds"].items():
                    key = (mode, side)
                    best[key] = min(best.get(key, float("inf")), sec)
    old, new = best.pop("records")
    for mode in old:
        for col in old[mode]:
            if old[mode][col] != new[mode][col]:
                raise RuntimeError(f"{mode} replay: {col} differs between {rev} and this tree")
    rows, out = [], {}
    for mode in old:
        b, e = best[(mode, "baseline")], best[(mode, "engine")]
        out[mode] = {"baseline_s": b, "engine_s": e, "ratio": e / b}
        rows.append(
            {"mode": mode, "baseline_s": b, "engine_s": e, "engine/baseline": round(e / b, 3)}
        )
    print_table(
        rows,
        f"this tree vs {rev}, {capacity:,} blocks, best of {max(repeat, 1)} (CPU s, interleaved)",
    )
    return out


def by_mode(capacity: int, repeat: int) -> dict:
    """Sequential and concurrent replay of the read table: requests/s of wall time."""
    from sim.engine import replay_concurrent
    from sim.replay import replay_sequential
    from traces import DEFAULT_TRACE, read_trace

    table = read_trace(DEFAULT_TRACE)
    n = len(table)
    runs = {
        "sequential": lambda: replay_sequential(table, capacity),
        "concurrent": lambda: replay_concurrent(table, capacity=capacity, progress=False),
        "concurrent, max_num_seqs=8": lambda: replay_concurrent(
            table, capacity=capacity, max_num_seqs=8, progress=False
        ),
    }
    rows, out = [], {}
    for name, fn in runs.items():
        best, r = float("inf"), None
        for _ in range(repeat):
            t0 = time.perf_counter()
            r = fn()
            best = min(best, time.perf_counter() - t0)
        row = {
            "mode": name,
            "seconds": best,
            "requests_per_s": n / best,
            "block_hit_ratio": round(r.block_hit_ratio, 4),
            "sim_makespan_s": getattr(r, "makespan_s", float("nan")),
            "queue_p99_s": getattr(r, "queue_p99_s", float("nan")),
        }
        rows.append(row)
        out[name] = row
    print_table(rows, f"replay modes, Mooncake synthetic trace ({n} requests), {capacity:,} blocks")
    return out


if __name__ == "__main__":
    main()
