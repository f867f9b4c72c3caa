"""``bench_replay.py --baseline-rev REV``: the "before" tree comes from a git worktree.

Against ``HEAD`` the two trees replay alike, so the run must pass its request-for-request
equality check, report both trees per mode, and leave no worktree behind. Times are
never looked at.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _worktrees() -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line.startswith("worktree ")]


@pytest.mark.timeout(300)
def test_baseline_rev_runs_the_old_tree_and_cleans_up(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    before = _worktrees()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "SAGELLM_BENCH_SMOKE": "1",
        "SAGELLM_BENCH_RESULTS": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_replay.py"),
         "--capacity", "500", "--repeat", "1", "--baseline-rev", "HEAD"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    payload = json.loads((tmp_path / "replay.json").read_text())
    assert payload["baseline_rev"] == "HEAD"
    assert sorted(payload["engine_vs_baseline"]) == ["concurrent", "sequential"]
    for row in payload["engine_vs_baseline"].values():
        assert sorted(row) == ["baseline_s", "engine_s", "ratio"]
    assert _worktrees() == before
