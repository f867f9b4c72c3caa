"""Iteration-level engine vs today's concurrent replay on the bundled trace (wall time).

Usage::

    python benchmarks/bench_iteration.py [--capacity 3000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import time

from _util import write_json


def main() -> None:
    from sim.iteration_run import simulate_iteration
    from sim.simulate import simulate
    from traces import DEFAULT_TRACE, read_trace

    ap = argparse.ArgumentParser()
    ap.add_argument("--capacity", default="3000")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    t = read_trace(DEFAULT_TRACE)
    cap = None if a.capacity == "inf" else int(a.capacity)

    def best(fn):
        out = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            r = fn()
            out.append(time.perf_counter() - t0)
        return min(out), r

    conc, _ = best(lambda: simulate(t, cap, mode="concurrent"))
    rows = {"concurrent_s": conc}
    for name, cost in (("linear", None), ("roofline", "roofline:gpu=h100,model=llama-3-8b")):
        s, r = best(lambda cost=cost: simulate_iteration(t, cap, cost=cost))
        rows[f"iteration_{name}_s"] = s
        rows[f"iteration_{name}_ratio"] = s / conc
        rows[f"iteration_{name}_steps"] = r.num_steps
    payload = {"requests": len(t), "capacity": a.capacity, **rows}
    print(json.dumps(payload, indent=1))
    write_json("iteration", payload)


if __name__ == "__main__":
    main()
