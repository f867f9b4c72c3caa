"""The console entry on an install without the workbench extra, and missing optional packages.

Each case runs a fresh interpreter whose ``sys.meta_path`` starts with a blocker
that makes the named packages unimportable, as on a base install
(``pip install .`` plus torch): the library imports, ``sage-kv-stats`` prints one
line naming the extra and exits 3, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli.entry import EXIT_MISSING, WORKBENCH_MODULES

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys

class _Blocker:
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

for _name in list(sys.modules):
    if _name.partition(".")[0] in BLOCKED:
        del sys.modules[_name]
sys.meta_path.insert(0, _Blocker(BLOCKED))
"""


def _run(blocked: tuple[str, ...], body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    code = f"BLOCKED = {blocked!r}\n{BLOCKER}\n{textwrap.dedent(body)}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_base_install_imports_the_library_and_uses_the_pool(tmp_path):
    proc = _run(
        (*WORKBENCH_MODULES, "pandas", "seaborn", "zmq"),
        """
        import sys
        import sagellm_kv_cache
        from sagellm_kv_cache import KVPool, PrefixCache
        pool = KVPool(max_tokens=1024)
        handle = pool.alloc(num_tokens=128, device="cpu")
        pool.free(handle)
        cache = PrefixCache(block_size=16, max_cached_blocks=100, enable_lru=True)
        hashes = cache.compute_block_hashes(list(range(48)))
        cache.insert(hashes, [{"block_id": i} for i in range(len(hashes))])
        print(cache.lookup(hashes)[1])
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "48"


@pytest.mark.parametrize("blocked", [WORKBENCH_MODULES, ("click",), ("polars",), ("matplotlib",)])
def test_entry_without_workbench_prints_one_line_naming_the_extra(tmp_path, blocked):
    proc = _run(
        blocked,
        """
        import sys
        from cli.entry import main
        sys.argv = ["sage-kv-stats", "replay", "--out", "run"]
        main()
        """,
        tmp_path,
    )
    assert proc.returncode == EXIT_MISSING
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "sagellm-kv-cache[workbench]" in lines[0]
    assert f"missing: {', '.join(blocked)}" in lines[0]
    assert not (tmp_path / "run").exists()


def test_entry_with_workbench_runs_the_group(tmp_path):
    proc = _run(
        (),
        "import sys\nfrom cli.entry import main\nsys.argv = ['sage-kv-stats', '--help']\nmain()",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "replay" in proc.stdout and "sweep" in proc.stdout


def test_missing_optional_package_inside_a_command_names_its_extra(tmp_path):
    # the group past the entry check: zmq (the [events] extra) missing when listen runs
    proc = _run(
        ("zmq",),
        """
        import sys
        from cli.main import cli
        sys.argv = ["sage-kv-stats", "listen", "tcp://127.0.0.1:5557", "--out", "rec"]
        cli()
        """,
        tmp_path,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "sagellm-kv-cache[events]" in lines[0]
