"""The seed page's Quick Start snippets run as written and print what they claim."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

from conftest import ROOT

POOL_SNIPPET = """
from sagellm_kv_cache.pool import KVPool
# Create a KV pool with budget control
pool = KVPool(max_tokens=1024)
# Allocate KV cache block
handle = pool.alloc(num_tokens=128, device="cpu")
print(f"Allocated handle: {handle.handle_id}, Tokens: {handle.num_tokens}")
# Free the handle
pool.free(handle)
"""

PREFIX_SNIPPET = """
from sagellm_kv_cache import PrefixCache
# Create cache with block-based hashing
cache = PrefixCache(block_size=16, max_cached_blocks=100, enable_lru=True)
# Insert prefix blocks
tokens = list(range(48)) # 3 blocks
hashes = cache.compute_block_hashes(tokens)
blocks = [{"block_id": i} for i in range(len(hashes))]
cache.insert(hashes, blocks)
# Lookup with prefix overlap
hit_blocks, num_tokens = cache.lookup(hashes)
print(f"Reused {num_tokens} tokens from cache!")
# Check hit rate
stats = cache.get_stats()
print(f"Hit rate: {stats['hit_rate']:.1%}")
"""


def run_snippet(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_pool_snippet_prints_handle_and_tokens():
    out = run_snippet(POOL_SNIPPET)
    assert re.fullmatch(
        r"Allocated handle: [0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}, Tokens: 128\n",
        out,
    )


def test_prefix_snippet_reuses_48_tokens_at_full_hit_rate():
    assert run_snippet(PREFIX_SNIPPET) == "Reused 48 tokens from cache!\nHit rate: 100.0%\n"


def test_import_is_light():
    out = run_snippet(
        "import sys, sagellm_kv_cache\n"
        "from sagellm_kv_cache import KVPool, PrefixCache\n"
        "heavy = [m for m in ('torch', 'polars', 'pandas', 'matplotlib', 'prometheus_client') if m in sys.modules]\n"
        "print(heavy)"
    )
    assert out == "[]\n"


def test_every_advertised_public_name_resolves():
    import sagellm_kv_cache as pkg

    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, name
