"""Sequential LRU replay speed on the bundled Mooncake trace, next to a bare loop.

Both include reading the JSONL file. The bare loop replays the same
semantics (full blocks only, leading-run hits, tail-first LRU, one entry per
hash) with a single OrderedDict and no validation; ours reads the trace
through the validating reader and replays it through the library's
BlockPool.

    python benchmarks/bench_replay.py [--capacity 10000]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict

from _util import print_table, write_json


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

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--capacity", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
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
    write_json(
        "replay", {"capacity_blocks": args.capacity, "results": res, "ours_over_bare_speed": speed}
    )


if __name__ == "__main__":
    main()
