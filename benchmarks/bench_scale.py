"""Scale: an N-block synthetic trace on Parquet, exact and sampled curves, replay vs a dict loop.

Writes ``--blocks`` blocks of the seeded synthetic generator
(``traces.generate_records``, ``block_size=16``, ``multi_turn_prob=0.5``) to a
Parquet file in batches, then measures, each in a fresh subprocess whose peak
RSS (``resource.getrusage``) is reported:

* ``replay``: exact sequential LRU replay streamed from the file
  (``sim.stream.replay_stream``) at ``--capacity`` blocks;
* ``curve``: the exact one-pass curve (``sim.mrc.lru_mrc``) of the table read
  whole (the read timed apart);
* ``sampled``: the ``--rate`` sampled curve (``sim.sampling``, ``--samples``
  independent samples) for each scheme of ``--key`` (``all``: ``stack``,
  ``root``, ``session``), its mean absolute error of token hit ratio against
  the exact curve at ``--points`` capacities, its mean reported spread and
  its speed-up over exact (a table row per scheme);
* ``--bundled``: the same comparison, in-process, on every bundled trace
  with at least ``--bundled-min`` full blocks, at ``--bundled-rate``
  (they are small, so a higher rate).

``--dict-check`` adds the issue's sequential-LRU comparison on the 13.3M-block
trace (``generate_trace(200_000, seed=1, block_size=16, multi_turn_prob=0.5)``,
``--dict-capacity`` blocks): the replay through the library pool, a bare
``OrderedDict`` loop of the same semantics (leading run of hits in use,
evict least recent, release tail-first; its hit count must equal the
replay's) and the curve, in one process; ``--profile`` prints the replay's
top functions by own time.

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


def child_sampled(path: str, caps: list[int], rate: float, samples: int, key: str) -> dict:
    from sim.sampling import SampleSpec, sampled_curve
    from traces import read_trace

    t0 = time.perf_counter()
    table = read_trace(path)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    df = sampled_curve(table, caps, SampleSpec(rate=rate, key=key, samples=samples))
    return {
        "s": time.perf_counter() - t0,
        "read_s": read_s,
        "token": df["token_hit_ratio"].to_list(),
        "spread": df["token_hit_ratio_spread"].to_list(),
    }


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


def child_dict_check(capacity: int, requests: int, profile: bool) -> dict:
    from sim.mrc import lru_mrc
    from sim.replay import replay_sequential
    from traces import generate_trace
    from traces.columnar import hash_arrays

    table = generate_trace(requests, seed=1, block_size=16, multi_turn_prob=0.5)
    values, offsets = hash_arrays(table)
    fulls = table["input_length"].to_numpy() // 16
    blocks = int(fulls.sum())
    t0 = time.perf_counter()
    r = replay_sequential(table, capacity)
    replay_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = dict_loop(values, offsets, fulls, capacity)
    dict_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lru_mrc(table).hit_ratios([capacity])
    curve_s = time.perf_counter() - t0
    out = {
        "blocks": blocks,
        "replay_s": replay_s,
        "dict_s": dict_s,
        "curve_s": curve_s,
        "same_hits": hits == int(r.records["hit_blocks"].sum()),
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
    elif kind == "sampled":
        out = child_sampled(rest[0], json.loads(rest[1]), float(rest[2]), int(rest[3]), rest[4])
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
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--samples", type=int, default=4)
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
    result |= {"curve": cur, "sampled": {}}
    lines = []
    for key in keys:
        smp = run_child(
            "sampled", str(path), json.dumps(cur["caps"]), str(args.rate), str(args.samples), key
        )
        err = np.abs(np.asarray(smp["token"]) - np.asarray(cur["token"]))
        smp |= {
            "mae": float(err.mean()),
            "max_err": float(err.max()),
            "speedup": cur["s"] / smp["s"],
        }
        result["sampled"][key] = smp
        rows.append({"step": f"{args.rate:.0%} sampled curve, {key} x{args.samples}", **_row(smp)})
        lines.append(
            f"sampled ({key}, {args.samples} samples) token_hit_ratio MAE {err.mean():.4f} "
            f"(max {err.max():.4f}), mean spread {np.mean(smp['spread']):.4f}, "
            f"{smp['speedup']:.1f}x faster than exact"
        )
    print_table(rows, f"{gen['blocks']:,} blocks, {gen['requests']:,} requests, {path}")
    print("\n".join(lines))
    if args.dict_check:
        d = run_child(
            "dict", str(args.dict_capacity), str(args.dict_requests), str(int(args.profile))
        )
        result["dict_check"] = d
        print(
            f"\n{d['blocks']:,} blocks @{args.dict_capacity}: replay {d['replay_s']:.2f}s, "
            f"OrderedDict {d['dict_s']:.2f}s -> replay at {d['dict_s'] / d['replay_s']:.2f}x the "
            f"dict's speed; curve {d['curve_s']:.2f}s = {d['curve_s'] / d['replay_s']:.2f}x a "
            f"replay; same hits: {d['same_hits']}; peak {d['peak_rss_mb']:.0f} MB"
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
