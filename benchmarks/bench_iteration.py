"""Iteration-level engine vs today's concurrent replay on the bundled trace (wall time).

Runs, interleaved ``--repeat`` times (best of each kept): the concurrent replay, the
iteration engine with the linear and the roofline cost model, and the plain per-step
loop it equals (``simulate_iteration(..., reference=True)``) as the before figure.
Ratios are over the concurrent replay of the same run.

Usage::

    python benchmarks/bench_iteration.py [--capacity 3000] [--repeat 3]
"""

from __future__ import annotations

import time

from _util import SMOKE, parse_args, print_table, write_json

ROOFLINE = "roofline:gpu=h100,model=llama-3-8b"


def main() -> None:
    from sim.iteration_run import simulate_iteration
    from sim.simulate import simulate
    from traces import DEFAULT_TRACE, read_trace

    a = parse_args(__doc__, capacity="3000", repeat=3, requests=(0, "first N requests (0: all)"))
    t = read_trace(DEFAULT_TRACE)
    if a.requests:
        t = t.head(a.requests)
    cap = None if a.capacity == "inf" else int(a.capacity)
    runs = {
        "concurrent": lambda: simulate(t, cap, mode="concurrent"),
        "iteration_linear": lambda: simulate_iteration(t, cap),
        "iteration_roofline": lambda: simulate_iteration(t, cap, cost=ROOFLINE),
        "plain_loop_linear": lambda: simulate_iteration(t, cap, reference=True),
        "plain_loop_roofline": lambda: simulate_iteration(t, cap, cost=ROOFLINE, reference=True),
    }
    best = dict.fromkeys(runs, float("inf"))
    steps = {}
    for _ in range(1 if SMOKE else a.repeat):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            r = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            steps[name] = r.stats.get("num_steps")
    conc = best["concurrent"]
    rows = [
        {"run": k, "seconds": v, "over_concurrent": v / conc, "steps": str(steps[k])}
        for k, v in best.items()
    ]
    print_table(rows, f"{len(t)} requests, capacity {a.capacity} blocks")
    payload = {
        "requests": len(t),
        "capacity": a.capacity,
        "repeat": a.repeat,
        "seconds": best,
        "over_concurrent": {k: v / conc for k, v in best.items()},
        "steps": steps,
    }
    write_json("iteration", payload)


if __name__ == "__main__":
    main()
