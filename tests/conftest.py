"""Shared factories for the tests (STYLE.md: make_pool, make_request...)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests run from a checkout even before `pip install -e .`
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("MPLBACKEND", "Agg")

from hypothesis import HealthCheck, settings  # noqa: E402

# Timing never decides a test: no per-example deadline, no too-slow health check
# (a loaded CI machine is slow). The "ci" profile also fixes the examples
# (derandomize), so a CI run is repeatable; .ci/run selects it.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    print_blob=True,
    database=None,  # nothing written into the checkout, nothing shared by xdist workers
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Test modules that take long: gloo process groups, executed notebooks, figure
#: rendering, a headless browser, subprocess-heavy scripts. They are marked
#: ``slow`` here, by module, so ``pytest -m "not slow"`` is the fast lane for
#: development; CI runs everything.
SLOW_MODULES = frozenset(
    {
        "test_transfer_gloo",
        "test_global_pool_gloo",
        "test_notebook_01",
        "test_notebook_02",
        "test_notebook_03",
        "test_notebook_params",
        "test_cli_visualize",
        "test_report",
        "test_benchmarks_smoke",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


from sagellm_kv_cache.pool import KVPool  # noqa: E402
from sagellm_kv_cache.storage import ModelShape  # noqa: E402

TINY = ModelShape(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16")


def make_pool(num_blocks: int = 8, block_size: int = 4, **kwargs) -> KVPool:
    """A small metadata-only pool unless a model_shape is given."""
    return KVPool(num_blocks=num_blocks, block_size=block_size, **kwargs)


def make_tokens(n: int, seed: int = 0, prefix: list[int] | None = None) -> list[int]:
    rng = random.Random(seed)
    body = [rng.randrange(32000) for _ in range(n - len(prefix or []))]
    return list(prefix or []) + body


@pytest.fixture
def pool() -> KVPool:
    return make_pool()


@pytest.fixture
def tensor_pool() -> KVPool:
    return make_pool(num_blocks=8, block_size=4, model_shape=TINY)
