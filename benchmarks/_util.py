"""Shared helpers for benchmark scripts: a printed table and a JSON file per run.

Run a script as ``python benchmarks/bench_x.py`` with the package installed
(``pip install -e ".[dev]"``); nothing here edits ``sys.path``.

Smoke runs (``tests/test_benchmarks_smoke.py``): with ``SAGELLM_BENCH_SMOKE=1``
in the environment a script runs every measurement once (:func:`best_of`) at
the tiny sizes the test passes, and with ``SAGELLM_BENCH_RESULTS=DIR`` its JSON
goes to ``DIR`` instead of ``benchmarks/results/``. A smoke run checks that the
script works, never how fast.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Where :func:`write_json` writes (``SAGELLM_BENCH_RESULTS`` overrides it).
RESULTS = Path(
    os.environ.get("SAGELLM_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)
#: A smoke run: one repetition of everything (sizes come from the command line).
SMOKE = os.environ.get("SAGELLM_BENCH_SMOKE") == "1"


def best_of(fn, repeat: int = 3) -> float:
    """Fastest wall time of ``repeat`` runs of ``fn()`` (seconds; one run in a smoke run)."""
    best = float("inf")
    for _ in range(1 if SMOKE else repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def print_table(rows: list[dict], title: str) -> None:
    if not rows:
        return
    cols = list(rows[0])
    fmt = [
        [
            f"{v:,.3f}"
            if isinstance(v, float) and abs(v) < 1000
            else f"{v:,.0f}"
            if isinstance(v, float)
            else str(v)
            for v in r.values()
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(f[i]) for f in fmt)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for f in fmt:
        print("  ".join(v.rjust(w) for v, w in zip(f, widths)))


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")
    return path
