"""The seed page's three scripts run as written (thin callers of the CLI and library)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.timeout(180)


def run(args, cwd):
    env = dict(os.environ, MPLBACKEND="Agg")
    out = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=150, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_profiling_demo_then_visualize_as_written(tmp_path):
    run(
        [
            str(ROOT / "examples/kv_profiling_demo.py"),
            "--num-accesses",
            "500",
            "--output",
            "stats.json",
        ],
        tmp_path,
    )
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["summary"]["total_accesses"] == 500 if "summary" in stats else stats
    out = run(
        [
            str(ROOT / "scripts/visualize_access_pattern.py"),
            "--input",
            "stats.json",
            "--type",
            "all",
            "--summary",
        ],
        tmp_path,
    )
    assert "500" in out


def test_prefix_cache_example_tours_the_api(tmp_path):
    out = run([str(ROOT / "examples/prefix_cache_example.py")], tmp_path)
    assert "[PrefixCache] second prompt reuses 32 tokens (2 blocks)" in out
    assert "[KVPool] second request: 48 cached tokens of 64" in out
    assert "[KVCacheManager] longest registered prefix: 64 tokens" in out
