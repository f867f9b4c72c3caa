"""Prefix-cache benchmark (the core issue's goals).

Requests of 1536 tokens: a shared 1024-token prefix plus 512 random tokens,
block size 16. Per request, through the seed API: ``compute_block_hashes`` +
``lookup`` + ``insert``. Measured in one run, next to:

* a bare loop that only chains sha256 over packed tokens and fills a dict
  (the floor any Python implementation pays);
* optionally the ``isagellm-kv-cache`` 0.5.4.15 package this project
  reimagines (``--fetch-seed-package DIR`` downloads and unpacks it with its
  ``isagellm-*`` dependencies; ``--seed-package DIR/site`` reuses that; it
  runs in a subprocess because it shares the import name);

Both caches are bounded (``max_cached_blocks=100_000``), as in the seed Quick
Start: that is where the seed package's per-request cost grows with the cache.
* per-request cost as the cache grows to 100k blocks (flatness).

    python benchmarks/bench_prefix_cache.py [--requests 600] [--seed-package /tmp/isag/site]
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from array import array

from _util import ROOT, parse_args, print_table, write_json

PREFIX_TOKENS, SUFFIX_TOKENS, BLOCK = 1024, 512, 16


def make_requests(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(32000) for _ in range(PREFIX_TOKENS)]
    return [prefix + [rng.randrange(32000) for _ in range(SUFFIX_TOKENS)] for _ in range(n)]


CAPACITY = 100_000  # blocks: a bounded cache, as in the seed Quick Start

SEED_API_LOOP = """
def run(reqs, PrefixCache, max_cached_blocks=100_000):
    cache = PrefixCache(block_size=16, max_cached_blocks=max_cached_blocks, enable_lru=True)
    for tokens in reqs:
        hashes = cache.compute_block_hashes(tokens)
        hit, n = cache.lookup(hashes)
        cache.insert(hashes, [{"block_id": i} for i in range(len(hashes))])
    return cache
"""


def seed_api(reqs, max_cached_blocks=CAPACITY):
    from sagellm_kv_cache import PrefixCache

    ns: dict = {}
    exec(SEED_API_LOOP, ns)
    return ns["run"](reqs, PrefixCache, max_cached_blocks)


def seed_api_unbounded(reqs):
    return seed_api(reqs, None)


def bare_loop(reqs):
    """Chain sha256 over packed tokens, fill a dict: no lookup semantics at all."""
    d: dict = {}
    sha = hashlib.sha256
    for tokens in reqs:
        data = array("q", tokens).tobytes()
        parent = b"\0" * 32
        for off in range(0, len(data), BLOCK * 8):
            parent = sha(parent + data[off : off + BLOCK * 8]).digest()
            d[parent] = off
    return d


def timed(fn, reqs, repeat=3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(reqs)
        best = min(best, time.perf_counter() - t0)
    return best


def fetch_seed_package(dest: str) -> str:
    """Download isagellm-kv-cache 0.5.4.15 and its isagellm-* dependencies (wheels) and
    unpack them into ``dest`` (used only by this benchmark; nothing of it is committed)."""
    import pathlib
    import zipfile

    d = pathlib.Path(dest)
    wheels = d / "wheels"
    site = d / "site"
    wheels.mkdir(parents=True, exist_ok=True)
    specs = [
        "isagellm-kv-cache==0.5.4.15",
        "isagellm-protocol>=0.5.4.0,<0.6.0",
        "isagellm-backend>=0.5.4.0,<0.6.0",
        "isagellm-comm>=0.5.4.0,<0.6.0",
    ]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), *specs],
        check=True,
        timeout=600,
    )
    for whl in wheels.glob("*.whl"):
        zipfile.ZipFile(whl).extractall(site)
    return str(site)


def seed_package(reqs_n: int, path: str) -> dict:
    code = (
        "import json, random, sys, time\n"
        f"sys.path.insert(0, {path!r})\n"
        "from sagellm_kv_cache.prefix_cache import PrefixCache\n"
        f"exec({SEED_API_LOOP!r})\n"
        f"rng = random.Random(0); P = [rng.randrange(32000) for _ in range({PREFIX_TOKENS})]\n"
        f"reqs = [P + [rng.randrange(32000) for _ in range({SUFFIX_TOKENS})] for _ in range({reqs_n})]\n"
        "t0 = time.perf_counter(); run(reqs, PrefixCache); dt = time.perf_counter() - t0\n"
        "print(json.dumps({'seconds': dt}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=3600,
        env={"PYTHONPATH": path},
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def flatness(sizes=(1_000, 10_000, 100_000), probe=400) -> list[dict]:
    """Per-request cost of the seed-API path with the cache already holding N blocks.

    Measured twice: as is, and with the cache's objects moved out of CPython's
    cyclic garbage collector after the fill (``gc.freeze()``, what a serving
    process does after warm-up). Each request leaves 96 new block dicts in the
    cache, so full collections come every few hundred requests and walk every
    object the cache holds: that cost grows with the cache whatever the cache's
    own algorithm does. The frozen column isolates the cache's own work.
    """
    rows = []
    for size in sizes:
        row = {"target_blocks": size}
        for frozen in (False, True):
            cached, us = _flat_probe(size, probe, frozen)
            row["cached_blocks"] = cached
            row["us_per_request_gc_frozen" if frozen else "us_per_request"] = us
        rows.append(row)
    return rows


def _flat_probe(size: int, probe: int, frozen: bool) -> tuple[int, float]:
    import gc

    from sagellm_kv_cache import PrefixCache

    cache = PrefixCache(block_size=BLOCK, max_cached_blocks=CAPACITY)
    rng = random.Random(size)
    while len(cache) < min(size, CAPACITY - 200):  # fill with unrelated 1536-token requests
        toks = [rng.randrange(32000) for _ in range(1536)]
        h = cache.compute_block_hashes(toks)
        cache.insert(h, list(range(len(h))))
    reqs = make_requests(probe, seed=size + 1)
    if frozen:
        gc.collect()
        gc.freeze()
    try:
        t0 = time.perf_counter()
        for tokens in reqs:
            hashes = cache.compute_block_hashes(tokens)
            cache.lookup(hashes)
            cache.insert(hashes, [{"block_id": i} for i in range(len(hashes))])
        dt = (time.perf_counter() - t0) / probe
    finally:
        if frozen:
            gc.unfreeze()
    return len(cache), dt * 1e6


def main() -> None:
    args = parse_args(
        __doc__,
        fetch_seed_package=(None, "download and unpack it into DIR first"),
        requests=600,
        seed_package=(None, "dir with isagellm-kv-cache 0.5.4.15 unpacked"),
    )
    if args.fetch_seed_package:
        args.seed_package = fetch_seed_package(args.fetch_seed_package)
    reqs = make_requests(args.requests)
    tokens = args.requests * (PREFIX_TOKENS + SUFFIX_TOKENS)
    t_ours = timed(seed_api, reqs)
    t_bare = timed(bare_loop, reqs)
    rows = [
        {
            "implementation": "sagellm-kv-cache (seed API)",
            "seconds": t_ours,
            "Mtokens_per_s": tokens / t_ours / 1e6,
            "vs_ours": 1.0,
        },
        {
            "implementation": "bare sha256 chain + dict",
            "seconds": t_bare,
            "Mtokens_per_s": tokens / t_bare / 1e6,
            "vs_ours": t_ours / t_bare,
        },
    ]
    result = {
        "requests": args.requests,
        "tokens": tokens,
        "ours_s": t_ours,
        "bare_s": t_bare,
        "ours_over_bare_speed": t_bare / t_ours,
    }
    if args.seed_package:
        seed = seed_package(args.requests, args.seed_package)
        if "seconds" in seed:
            rows.append(
                {
                    "implementation": "isagellm-kv-cache 0.5.4.15",
                    "seconds": seed["seconds"],
                    "Mtokens_per_s": tokens / seed["seconds"] / 1e6,
                    "vs_ours": t_ours / seed["seconds"],
                }
            )
            result["seed_package_s"] = seed["seconds"]
            result["speedup_vs_seed_package"] = seed["seconds"] / t_ours
        else:
            result["seed_package_error"] = seed["error"]
    print_table(
        rows, f"prefix path: {args.requests} requests x 1536 tokens (1024 shared), block 16"
    )
    flat = flatness()
    print_table(flat, "per-request cost as the cache grows")
    result["flatness"] = flat
    print(f"\nours / bare loop speed: {result['ours_over_bare_speed']:.2f} (goal >= 0.5)")
    if "speedup_vs_seed_package" in result:
        print(
            f"speed-up over isagellm-kv-cache 0.5.4.15: {result['speedup_vs_seed_package']:.0f}x (goal >= 200x)"
        )
    write_json("prefix_cache", result)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
