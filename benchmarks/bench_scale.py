"""Scale: an N-block synthetic trace on Parquet, exact and sampled curves, replay vs a dict loop.

Writes ``--blocks`` blocks of the seeded synthetic generator
(``traces.generate_records``, ``block_size=16``, ``multi_turn_prob=0.5``) to a
Parquet file in batches, then measures, each in a fresh subprocess whose peak
RSS (``resource.getrusage``) is reported:

* ``replay``: exact sequential LRU replay streamed from the file
  (``sim.stream.replay_stream``) at ``--capacity`` blocks;
* ``curve``: the exact one-pass curve (``sim.mrc.lru_mrc``) of the table read
  whole (the read timed apart);
* ``compare``: in one process, the exact curve and the ``--rate`` sampled
  curve (``sim.sampling``) for each scheme of ``--key`` (``all``: ``stack``,
  ``root``, ``session``) in ``--rounds`` alternating rounds (process CPU
  time, median): the sampled curve's mean absolute error of token hit ratio
  against exact at ``--points`` capacities, its error estimate (one sample's
  spread / sqrt(samples)) and its speed ratio to exact. ``--rate`` is the share
  of the trace looked at in all: for ``stack`` ``--samples`` disjoint hash
  bands of ``rate / samples`` each, from one scan; the request keys replay
  ``--samples`` samples of ``rate`` each (one round: slow, and far off);
* ``--bundled``: the same comparison, in-process, on every bundled trace
  with at least ``--bundled-min`` full blocks, at ``--bundled-rate``
  (they are small, so a higher rate).

``--dict-check`` adds the issue's sequential-LRU comparison on the 13.3M-block
trace (``generate_trace(200_000, seed=1, block_size=16, multi_turn_prob=0.5)``,
``--dict-capacity`` blocks): the replay through the library pool, a bare
``OrderedDict`` loop of the same semantics (leading run of hits in use,
evict least recent, release tail-first; its hit count must equal the
replay's) and the curve, in one process, in CPU seconds (replay and dict loop
alternating, ``DICT_ROUNDS`` rounds, medians and each round's ratio);
``--profile`` prints the replay's top functions by own time.

    python benchmarks/bench_scale.py [--blocks 20e6] [--dict-check] [--profile]
    python benchmarks/bench_scale.py --blocks 1e9 --dir /big/disk
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _util import SMOKE, print_table, write_json

MB = 1024 * 1024


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_synthetic(path: Path, blocks: int, seed: int, batch: int = 200_000) -> dict:
    """Generate until ``blocks`` blocks are written; one batch of records in memory."""
    import pyarrow.parquet as pq

    from traces._common import records_to_frame
    from traces.synthetic import generate_records

    t0 = time.perf_counter()
    writer = None
    n_blocks = n_req = 0
    # every request has a block at least, so ``blocks`` requests are always enough
    recs = generate_records(blocks, seed=seed, block_size=16, multi_turn_prob=0.5)
    while n_blocks < blocks:
        chunk = []
        for r in recs:
            chunk.append(r)
            n_blocks += len(r.block_hashes)
            if len(chunk) >= batch or n_blocks >= blocks:
                break
        if not chunk:
            break
        table = records_to_frame(chunk, with_sessions=True).to_arrow()
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        n_req += len(chunk)
    assert writer is not None
    writer.close()
    return {
        "blocks": n_blocks,
        "requests": n_req,
        "gen_s": time.perf_counter() - t0,
        "file_mb": path.stat().st_size / MB,
    }


# -- the measurements, each run in a child process --------------------------------------------
def child_replay(path: str, capacity: int) -> dict:
    from sim.stream import replay_stream

    t0 = time.perf_counter()
    s = replay_stream(path, capacity).summary()
    return {"s": time.perf_counter() - t0, "token_hit_ratio": s["token_hit_ratio"]}


def _caps(m, points: int) -> list[int]:
    hi = max(m.max_request_blocks + 1, m.distinct_blocks)
    return np.unique(np.geomspace(m.max_request_blocks, hi, points).astype(int)).tolist()


def child_curve(path: str, points: int) -> dict:
    from sim.mrc import lru_mrc
    from traces import read_trace

    t0 = time.perf_counter()
    table = read_trace(path)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = lru_mrc(table)
    caps = _caps(m, points)
    tok = m.hit_ratios(caps)["token_hit_ratio"].to_list()
    return {"s": time.perf_counter() - t0, "read_s": read_s, "caps": caps, "token": tok}


def _spec(key: str, rate: float, samples: int):
    """``rate`` is the share of the trace looked at in all: ``samples`` disjoint bands of
    ``rate / samples`` each for ``stack`` (one scan), ``samples`` samples of ``rate`` for the
    request keys (each replays its own sample)."""
    from sim.sampling import SampleSpec

    per = rate / samples if key == "stack" else rate
    return SampleSpec(rate=per, key=key, samples=samples)


def child_compare(path: str, points: int, rate: float, samples: int, keys: list, rounds: int):
    """Exact and sampled curves of one table in one process, in alternating rounds (process
    CPU time, median): each key's mean absolute error and its speed ratio to exact."""
    from sim.mrc import lru_mrc
    from sim.sampling import sampled_curve
    from traces import read_trace

    table = read_trace(path)
    small = table.head(200)  # compile (or load) both kernels before timing
    lru_mrc(small)
    for key in keys:
        sampled_curve(small, [10, 100], _spec(key, rate, samples))
    times: dict = {"exact": []} | {k: [] for k in keys}
    m = lru_mrc(table)
    caps = _caps(m, points)
    exact = np.asarray(m.hit_ratios(caps)["token_hit_ratio"].to_list())
    del m
    figures: dict = {}
    for r in range(rounds):
        t0 = time.process_time()
        lru_mrc(table).hit_ratios(caps)
        times["exact"].append(time.process_time() - t0)
        for key in keys:
            if key != "stack" and r:  # the request keys are slow and far off: one round
                continue
            t0 = time.process_time()
            df = sampled_curve(table, caps, _spec(key, rate, samples))
            times[key].append(time.process_time() - t0)
            figures[key] = df
    exact_s = float(np.median(times["exact"]))
    out: dict = {"caps": caps, "exact_token": exact.tolist(), "exact_s": exact_s, "keys": {}}
    for key in keys:
        df = figures[key]
        err = np.abs(df["token_hit_ratio"].to_numpy() - exact)
        spread = df["token_hit_ratio_spread"].to_numpy()
        out["keys"][key] = {
            "rate_per_sample": float(df["rate"][0]),
            "samples": samples,
            "s": float(np.median(times[key])),
            "rounds_s": times[key],
            "mae": float(err.mean()),
            "max_err": float(err.max()),
            "mean_spread": float(spread.mean()),
            # the error of the mean over the samples: one sample's spread / sqrt(samples)
            "mean_stderr": float(spread.mean() / np.sqrt(samples)),
            "speedup": exact_s / float(np.median(times[key])),
            "token": df["token_hit_ratio"].to_list(),
        }
    out["exact_rounds_s"] = times["exact"]
    return out


def dict_loop(values: np.ndarray, offsets: np.ndarray, fulls: np.ndarray, cap: int) -> int:
    """Bare sequential LRU over the same full blocks: hit blocks in total."""
    from collections import OrderedDict

    od: OrderedDict = OrderedDict()
    move, pop, popitem = od.move_to_end, od.pop, od.popitem
    hits = 0
    flat = values.tolist()
    starts = offsets[:-1].tolist()
    for s, full in zip(starts, fulls.tolist()):
        if not full or full > cap:
            continue
        hs = flat[s : s + full]
        k = 0
        for h in hs:  # leading run of cached blocks: in use while the request runs
            if h not in od:
                break
            k += 1
        for h in hs[:k]:
            pop(h)
        while len(od) + full > cap:  # evict least recent unused
            popitem(last=False)
        for h in reversed(hs):  # release tail-first: the first block ends most recent
            od[h] = None
            move(h)
        hits += k
    return hits


#: interleaved rounds of the dict check (replay, dict loop, replay, ...)
DICT_ROUNDS = 3


def child_dict_check(capacity: int, requests: int, profile: bool) -> dict:
    from sim.mrc import lru_mrc
    from sim.replay import replay_sequential
    from traces import generate_trace
    from traces.columnar import hash_arrays

    table = generate_trace(requests, seed=1, block_size=16, multi_turn_prob=0.5)
    values, offsets = hash_arrays(table)
    fulls = table["input_length"].to_numpy() // 16
    blocks = int(fulls.sum())
    # process CPU time (single-threaded work; other processes on the machine do not
    # count), replay and dict loop alternating for DICT_ROUNDS rounds, medians
    replay_r, dict_r = [], []
    same = True
    for _ in range(DICT_ROUNDS):
        t0 = time.process_time()
        r = replay_sequential(table, capacity)
        replay_r.append(time.process_time() - t0)
        t0 = time.process_time()
        hits = dict_loop(values, offsets, fulls, capacity)
        dict_r.append(time.process_time() - t0)
        same &= hits == int(r.records["hit_blocks"].sum())
    t0 = time.process_time()
    lru_mrc(table).hit_ratios([capacity])
    curve_s = time.process_time() - t0
    out = {
        "blocks": blocks,
        "replay_s": float(np.median(replay_r)),
        "dict_s": float(np.median(dict_r)),
        "ratio_rounds": [d / x for d, x in zip(dict_r, replay_r)],
        "curve_s": curve_s,
        "same_hits": same,
    }
    if profile:
        import cProfile
        import io
        import pstats

        small = table.head(max(1, requests // 10))
        pr = cProfile.Profile()
        pr.enable()
        replay_sequential(small, capacity)
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(14)
        out["profile"] = buf.getvalue()
    return out


def run_child(*argv: str) -> dict:
    """Run ``--child ...`` in a fresh interpreter; its JSON result plus its peak RSS."""
    env = dict(os.environ)
    res = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=6 * 3600,
    )
    if res.returncode:
        raise RuntimeError(f"child {argv[0]} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_main(argv: list[str]) -> None:
    kind, *rest = argv
    if kind == "replay":
        out = child_replay(rest[0], int(rest[1]))
    elif kind == "curve":
        out = child_curve(rest[0], int(rest[1]))
    elif kind == "compare":
        path, points, rate, samples, keys, rounds = rest
        out = child_compare(
            path, int(points), float(rate), int(samples), keys.split(","), int(rounds)
        )
    else:
        out = child_dict_check(int(rest[0]), int(rest[1]), rest[2] == "1")
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--blocks", type=float, default=20e6, help="trace size in blocks (1e9 ok)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--capacity", type=int, default=100_000, help="replay capacity, blocks")
    ap.add_argument("--points", type=int, default=20, help="capacities compared")
    ap.add_argument("--rate", type=float, default=0.01, help="share looked at, all samples")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    ap.add_argument("--key", default="all", choices=["all", "stack", "root", "session"])
    ap.add_argument("--bundled", action="store_true", help="also the bundled traces")
    ap.add_argument("--bundled-rate", type=float, default=0.1)
    ap.add_argument("--bundled-min", type=int, default=2000, help="full blocks, at least")
    ap.add_argument("--dir", default=None, help="where the Parquet file goes (default: tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the Parquet file")
    ap.add_argument("--skip-replay", action="store_true")
    ap.add_argument("--dict-check", action="store_true", help="replay vs OrderedDict, 13.3M")
    ap.add_argument("--dict-requests", type=int, default=200_000)
    ap.add_argument("--dict-capacity", type=int, default=200_000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    out_dir = Path(args.dir or tempfile.mkdtemp(prefix="bench_scale_"))
    path = out_dir / f"synthetic_{int(args.blocks)}.parquet"
    gen = write_synthetic(path, int(args.blocks), args.seed, batch=2_000 if SMOKE else 200_000)
    rows = [{"step": "generate+write", "s": gen["gen_s"], "peak_rss_mb": peak_rss_mb()}]
    result: dict = {"trace": gen, "capacity": args.capacity}
    if not args.skip_replay:
        rep = run_child("replay", str(path), str(args.capacity))
        rows.append({"step": f"exact replay @{args.capacity}", **_row(rep)})
        result["replay"] = rep
    cur = run_child("curve", str(path), str(args.points))
    rows.append({"step": "exact curve", **_row(cur)})
    keys = ["stack", "root", "session"] if args.key == "all" else [args.key]
    result["curve"] = cur
    cmp = run_child(
        "compare",
        str(path),
        str(args.points),
        str(args.rate),
        str(args.samples),
        ",".join(keys),
        str(1 if SMOKE else args.rounds),
    )
    result["sampled"] = cmp
    print_table(rows, f"{gen['blocks']:,} blocks, {gen['requests']:,} requests, {path}")
    table_rows = [
        {"curve": "exact", "cpu_s": cmp["exact_s"], "speedup": 1.0}
        | {"mae": 0.0, "max_err": 0.0, "stderr": 0.0}
    ]
    for key, k in cmp["keys"].items():
        table_rows.append(
            {
                "curve": f"{key}: {args.samples} x {k['rate_per_sample']:.4%}",
                "cpu_s": k["s"],
                "speedup": k["speedup"],
                "mae": k["mae"],
                "max_err": k["max_err"],
                "stderr": k["mean_stderr"],
            }
        )
    print_table(
        table_rows,
        f"{args.rate:.0%} sampled curves vs exact, one process, median of "
        f"{len(cmp['exact_rounds_s'])} alternating rounds (process CPU s); token hit ratio at "
        f"{len(cmp['caps'])} capacities; peak {cmp['peak_rss_mb']:.0f} MB",
    )
    if args.dict_check:
        d = run_child(
            "dict", str(args.dict_capacity), str(args.dict_requests), str(int(args.profile))
        )
        result["dict_check"] = d
        print(
            f"\n{d['blocks']:,} blocks @{args.dict_capacity}: replay {d['replay_s']:.2f}s, "
            f"OrderedDict {d['dict_s']:.2f}s (CPU s, medians of {DICT_ROUNDS} interleaved "
            f"rounds) -> replay at {d['dict_s'] / d['replay_s']:.2f}x the dict's speed (rounds: "
            f"{', '.join(f'{x:.2f}' for x in d['ratio_rounds'])}); curve {d['curve_s']:.2f}s = "
            f"{d['curve_s'] / d['replay_s']:.2f}x a replay; same hits: {d['same_hits']}; "
            f"peak {d['peak_rss_mb']:.0f} MB"
        )
        if d.get("profile"):
            print(d["profile"])
    if args.bundled:
        result["bundled"] = bundled(args.bundled_rate, args.samples, args.points, args.bundled_min)
    write_json("bench_scale", result)
    if not args.keep and args.dir is None:
        path.unlink()


def bundled(rate: float, samples: int, points: int, min_blocks: int) -> list[dict]:
    """Exact against the ``stack`` sampled curve on each bundled trace (in-process)."""
    from sim.mrc import lru_mrc
    from sim.sampling import SampleSpec, sampled_curve
    from traces import read_trace

    rows = []
    for path in sorted((Path(__file__).parent.parent / "traces" / "data").iterdir()):
        try:
            table = read_trace(path)
        except Exception:  # README, licences: not traces
            continue
        t0 = time.perf_counter()
        m = lru_mrc(table)
        exact_s = time.perf_counter() - t0
        if m.full_blocks < min_blocks or m.distinct_blocks < 2:
            continue
        caps = _caps(m, points)
        exact = np.asarray(m.hit_ratios(caps)["token_hit_ratio"].to_list())
        t0 = time.perf_counter()
        df = sampled_curve(table, caps, SampleSpec(rate=rate, key="stack", samples=samples))
        smp_s = time.perf_counter() - t0
        err = np.abs(df["token_hit_ratio"].to_numpy() - exact)
        rows.append(
            {
                "trace": path.name,
                "blocks": m.full_blocks,
                "rate": rate,
                "mae": float(err.mean()),
                "max_err": float(err.max()),
                "spread": float(df["token_hit_ratio_spread"].mean()),
                "exact_s": exact_s,
                "sampled_s": smp_s,
            }
        )
    print_table(rows, f"bundled traces: stack sampling at {rate:.0%} x{samples} vs exact")
    return rows


def _row(r: dict) -> dict:
    return {"s": r["s"], "peak_rss_mb": r["peak_rss_mb"]}


if __name__ == "__main__":
    main()
