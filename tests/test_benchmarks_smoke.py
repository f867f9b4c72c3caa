"""Every benchmark script runs at a tiny size and writes its JSON (smoke runs).

Each case starts ``python benchmarks/<script>.py`` as a user would (the package
importable, no ``sys.path`` edits in the script), with ``SAGELLM_BENCH_SMOKE=1``
(one repetition of each measurement, ``benchmarks/_util.py``) and
``SAGELLM_BENCH_RESULTS`` pointing at a temporary folder. A case asserts only
that the script exits 0 and writes its JSON; it never looks at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

#: script -> (tiny arguments, JSON file it writes; "{out}" is the temporary folder)
SMOKE_RUNS: dict[str, tuple[list[str], str]] = {
    "compare_vllm_scheduler.py": (["--requests", "5"], "compare_vllm_scheduler.json"),
    "bench_eviction.py": (["--capacity", "500", "--repeat", "1", "--policies", "lru,fifo"], "eviction.json"),
    "bench_fleet.py": (["--capacity", "500", "--instances", "2", "--repeat", "1"], "fleet.json"),
    "bench_hooks.py": (["--requests", "20", "--blocks", "512", "--repeat", "1"], "hooks.json"),
    "bench_iteration.py": (["--capacity", "500", "--repeat", "1"], "iteration.json"),
    "bench_mrc.py": (["--capacity", "500", "--points", "4", "--repeat", "1"], "mrc.json"),
    "bench_offload.py": (["--blocks", "2", "--repeat", "1"], "offload.json"),
    "bench_plan.py": (["--small", "100", "--large", "1000", "--repeat", "1", "--policies", "lru"], "plan.json"),
    "bench_pool.py": (["--requests", "20", "--blocks", "2048"], "pool.json"),
    "bench_prefix_cache.py": (["--requests", "20"], "prefix_cache.json"),
    "bench_profiling.py": (["--calls", "2000"], "profiling.json"),
    "bench_scale.py": (["--blocks", "20000", "--capacity", "1000", "--points", "3", "--samples", "1"], "bench_scale.json"),
    "bench_replay.py": (["--capacity", "500", "--repeat", "1"], "replay.json"),
    "bench_sweep.py": (["--jobs", "2", "--workers", "1", "--repeat", "1"], "sweep.json"),
    "bench_transfer.py": (["--sizes-mib", "4", "--repeat", "1", "--backends", "gloo"], "bench_transfer.json"),
    "profile_step_times.py": (
        ["--device", "cpu", "--tiny", "--tokens", "1", "16", "--kv-tokens", "0", "64",
         "--warmup", "1", "--repeat", "1", "--out", "{out}/step_times.json"],
        "step_times.json",
    ),
}  # fmt: skip


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    # gpu_checks.py is the device check (its own --smoke runs the suite's GPU tests): not a benchmark
    assert scripts - {"gpu_checks.py"} == set(SMOKE_RUNS)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_smoke_run(script, tmp_path):
    args, written = SMOKE_RUNS[script]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "SAGELLM_BENCH_SMOKE": "1",
        "SAGELLM_BENCH_RESULTS": str(tmp_path),
        "MPLBACKEND": "Agg",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *(a.format(out=tmp_path) for a in args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = tmp_path / written
    assert out.is_file(), f"{script} wrote no {written}: {proc.stdout[-1000:]}"
    assert isinstance(json.loads(out.read_text()), dict)
