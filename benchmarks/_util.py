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

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Where :func:`write_json` writes (``SAGELLM_BENCH_RESULTS`` overrides it).
RESULTS = Path(
    os.environ.get("SAGELLM_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)
#: A smoke run: one repetition of everything (sizes come from the command line).
SMOKE = os.environ.get("SAGELLM_BENCH_SMOKE") == "1"


def parse_args(doc: str | None, argv: list[str] | None = None, **options) -> argparse.Namespace:
    """The command line of a benchmark script whose ``--help`` is its docstring ``doc``.

    Each keyword names an option (``plan_only`` -> ``--plan-only``) by its default:
    an int or a str takes a value of that type, ``False`` is a flag, None a string
    that defaults to None. A ``(default, help)`` pair adds the help text::

        args = parse_args(__doc__, capacity=10_000, repeat=3, policies=("", "a subset"))
    """
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, spec in options.items():
        default, text = spec if isinstance(spec, tuple) else (spec, None)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            ap.add_argument(flag, action="store_true", help=text)
        elif default is None:
            ap.add_argument(flag, default=None, help=text)
        else:
            ap.add_argument(flag, type=type(default), default=default, help=text)
    return ap.parse_args(argv)


def run_worker(script: str, src: str | Path, args: list[str], timeout: float = 3600) -> dict:
    """Run ``python script *args`` in a fresh interpreter that imports the library,
    ``sim`` and ``traces`` from the checkout ``src``; the JSON on its last output line."""
    path = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker in {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached ``git worktree`` of this repository at ``rev`` in a temporary folder
    (removed again on exit): the "before" tree of a before/after measurement."""
    tmp = Path(tempfile.mkdtemp(prefix="sagellm-base-")) / "tree"
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", "--quiet", str(tmp), rev], check=True)
    try:
        yield tmp
    finally:
        subprocess.run([*git, "remove", "--force", str(tmp)], check=False)
        with contextlib.suppress(OSError):
            tmp.parent.rmdir()


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
