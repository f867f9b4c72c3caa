"""One-pass LRU miss-ratio curve vs direct replays, and the Belady OPT replay, on Mooncake.

The trace is read once, outside the timings. ``lru_mrc`` is timed with the
``hit_ratios`` call for ``--points`` capacities (log-spaced from the largest
request to the trace's distinct blocks, where the curve is exact) and compared
with ONE direct ``replay_sequential`` at ``--capacity`` (goal: the whole curve
costs <= 5x that one replay). The curve is checked against direct replays at
three of its capacities. ``replay_opt`` is timed at ``--capacity``.

    python benchmarks/bench_mrc.py [--capacity 10000] [--points 100] [--repeat 3]
"""

from __future__ import annotations

import numpy as np
from _util import best_of, parse_args, print_table, write_json


def main() -> None:
    from sim.mrc import lru_mrc
    from sim.opt import replay_opt
    from sim.replay import replay_sequential
    from traces import read_trace

    args = parse_args(__doc__, capacity=10_000, points=100, repeat=3)

    table = read_trace()
    m = lru_mrc(table)
    caps = np.unique(
        np.geomspace(m.max_request_blocks, m.distinct_blocks, args.points).astype(int)
    ).tolist()
    while len(caps) < args.points:  # geomspace rounding merged a few: top up linearly
        caps = sorted(set(caps) | {caps[-1] + len(caps)})

    curve = {}

    def one_pass():
        curve["df"] = lru_mrc(table).hit_ratios(caps)

    replay = {}

    def direct():
        replay["r"] = replay_sequential(table, args.capacity, "lru")

    opt = {}

    def belady():
        opt["r"] = replay_opt(table, args.capacity)

    t_mrc = best_of(one_pass, args.repeat)
    t_replay = best_of(direct, args.repeat)
    t_opt = best_of(belady, args.repeat)

    df = curve["df"]
    by_cap = dict(zip(df["capacity_blocks"].to_list(), df["hit_blocks"].to_list()))
    checked = [caps[0], caps[len(caps) // 2], caps[-1]]
    for c in checked:
        assert by_cap[c] == replay_sequential(table, c, "lru").hit_blocks, c
    r, o = replay["r"], opt["r"]
    mrc_at = m.hit_ratios([args.capacity]).row(0, named=True)
    assert mrc_at["hit_blocks"] == r.hit_blocks

    ratio = t_mrc / t_replay
    rows = [
        {
            "run": f"lru_mrc + hit_ratios at {len(caps)} capacities",
            "seconds": t_mrc,
            "x_one_replay": ratio,
            "block_hit_ratio": round(mrc_at["block_hit_ratio"], 4),
        },
        {
            "run": f"replay_sequential lru @ {args.capacity:,}",
            "seconds": t_replay,
            "x_one_replay": 1.0,
            "block_hit_ratio": round(r.block_hit_ratio, 4),
        },
        {
            "run": f"replay_opt @ {args.capacity:,}",
            "seconds": t_opt,
            "x_one_replay": t_opt / t_replay,
            "block_hit_ratio": round(o.block_hit_ratio, 4),
        },
    ]
    print_table(
        rows,
        f"Mooncake trace ({m.full_blocks:,} full blocks, {m.num_requests:,} requests), "
        f"best of {args.repeat}",
    )
    print(
        f"\ncurve of {len(caps)} capacities / one direct replay: {ratio:.2f}x (goal <= 5x); "
        f"{len(caps)} direct replays would take ~{len(caps) * t_replay:.1f} s"
    )
    print(
        f"curve checked against direct replays at {checked}; "
        f"infinite block hit ratio {m.infinite_block_hit_ratio:.4f}"
    )
    write_json(
        "mrc",
        {
            "trace": "mooncake",
            "full_blocks": m.full_blocks,
            "num_requests": m.num_requests,
            "max_request_blocks": m.max_request_blocks,
            "distinct_blocks": m.distinct_blocks,
            "capacity_blocks": args.capacity,
            "num_capacities": len(caps),
            "mrc_seconds": t_mrc,
            "replay_seconds": t_replay,
            "opt_seconds": t_opt,
            "mrc_over_one_replay": ratio,
            "goal_mrc_over_one_replay": 5.0,
            "lru_block_hit_ratio": r.block_hit_ratio,
            "opt_block_hit_ratio": o.block_hit_ratio,
            "infinite_block_hit_ratio": m.infinite_block_hit_ratio,
            "curve": df.select(
                "capacity_blocks", "token_hit_ratio", "block_hit_ratio", "request_hit_ratio"
            ).to_dicts(),
        },
    )


if __name__ == "__main__":
    main()
