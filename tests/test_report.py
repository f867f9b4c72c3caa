"""``sage-kv-stats report``: the HTML page, and headless Chromium decoding every figure.

The browser test needs Chromium (Debian: ``apt-get install -y chromium``; CI
installs it). Without it the test FAILS with that instruction: it is never
skipped silently. Set ``SAGELLM_KV_CHROMIUM`` to use another binary.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from cli.main import cli
from cli.report_cmds import report

CHROMIUM = os.environ.get("SAGELLM_KV_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    dirs = []
    for policy in ("lru", "fifo"):
        out = base / policy
        r = CliRunner().invoke(cli, ["replay", "--policy", policy, "--out", str(out)])
        assert r.exit_code == 0, r.output
        dirs.append(out)
    return dirs


@pytest.fixture(scope="module")
def page(two_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    r = CliRunner().invoke(report, [str(d) for d in two_runs] + ["--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_report_is_self_contained_with_both_runs(page, two_runs):
    text = page.read_text()
    imgs = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert len(imgs) >= 2 * 6 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "http://" not in text and "https://" not in text
    assert text.count("<summary>config</summary>") == 2
    header = re.search(r"<tr><th>metric</th>(.*?)</tr>", text, re.S).group(1).replace("\n", "")
    assert header == "<th>lru</th><th>fifo</th>"
    assert "<td>token_hit_ratio</td>" in text


def test_report_default_path_is_in_the_first_run(two_runs):
    r = CliRunner().invoke(report, [str(two_runs[0])])
    assert r.exit_code == 0, r.output
    assert (two_runs[0] / "report.html").is_file()


def test_report_of_a_missing_run_names_it(tmp_path):
    r = CliRunner().invoke(report, [str(tmp_path / "nope")])
    assert r.exit_code != 0 and "nope" in r.output


def test_report_renders_every_figure_in_headless_chromium(page, tmp_path):
    if CHROMIUM is None:
        pytest.fail(
            "headless Chromium is needed for this test: apt-get install -y chromium "
            "(or set SAGELLM_KV_CHROMIUM to a Chromium/Chrome binary)"
        )
    total = page.read_text().count("<img ")
    cmd = [
        CHROMIUM,
        "--headless=new",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:500]
    ok = re.search(r'data-figures-ok="(\d+)"', body.group(1))
    seen = re.search(r'data-figures-total="(\d+)"', body.group(1))
    assert ok and seen, body.group(1)
    assert int(seen.group(1)) == total > 0
    assert int(ok.group(1)) == total, f"{ok.group(1)} of {total} figures decoded"
