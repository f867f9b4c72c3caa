"""Hook overhead on the engine-facing path (goal: each hook at most 1.10x the bare pool).

Per request: 1536 prompt tokens (a shared 1024-token prefix + 512 random
tokens, block 16) -> ``alloc_with_prefix`` -> ``cache_blocks`` -> ``free``.
The pool is small enough that, once warm, every request evicts the 32 blocks
it needs, so eviction hooks run too. Variants: no hook, ``MetricsHook``,
``KVEventStream`` (subscriber-free ring buffer), both, and
``AccessStatsHook``. Work a hook defers is timed too: the collector turning
its queue into records and one ``MetricsHook.snapshot()`` (a scrape, which
folds the buffered observations), and so are the garbage collections a
hook's allocations make due (each run starts after a full collection). Each variant runs ``--repeat`` times
interleaved with the others (one round runs every variant once, in order); a
variant's slowdown is the median over the rounds of its
process CPU time over that round's bare pool, so drift between rounds on a
shared machine cancels. The best run of each is printed too.

    python benchmarks/bench_hooks.py [--requests 2000] [--blocks 8192] [--repeat 3]
"""

from __future__ import annotations

import gc
import importlib.util
import random
import statistics
import time

from _util import parse_args, print_table, write_json


def make_requests(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(32000) for _ in range(1024)]
    return [prefix + [rng.randrange(32000) for _ in range(512)] for _ in range(n)]


def _metrics(pool):
    from sagellm_kv_cache.observability import MetricsCollector, MetricsHook

    return [MetricsHook(MetricsCollector(), pool, name="bench")]


def _events(pool):
    from sagellm_kv_cache.observability import KVEventStream

    return [KVEventStream(pool)]


def _both(pool):
    return _metrics(pool) + _events(pool)


def _access_stats(pool):
    from sagellm_kv_cache.profiling.hook import AccessStatsHook

    return [AccessStatsHook()]


VARIANTS = {
    "no hook": lambda pool: [],
    "MetricsHook": _metrics,
    "KVEventStream": _events,
    "MetricsHook + KVEventStream": _both,
}
if importlib.util.find_spec("sagellm_kv_cache.profiling.hook") is not None:
    VARIANTS["AccessStatsHook"] = _access_stats


def run_once(reqs, num_blocks: int, make_hooks) -> tuple[float, dict]:
    from sagellm_kv_cache.pool import KVPool

    pool = KVPool(num_blocks=num_blocks, block_size=16)
    hooks = make_hooks(pool)
    for h in hooks:
        pool.add_hook(h)
    alloc, cache, free = pool.alloc_with_prefix, pool.cache_blocks, pool.free
    # start every variant from an empty young generation: a collection the previous
    # variant's garbage made due would otherwise land in this one's time
    gc.collect()
    t0 = time.process_time()  # CPU time: steadier than wall time on a shared machine
    for tokens in reqs:
        handle, _ = alloc(tokens)
        cache(handle)
        free(handle)
    snaps = []
    for h in hooks:  # work a hook defers counts: a collector's queue, a scrape's fold
        if hasattr(h, "collector") and hasattr(h.collector, "record_prompt"):
            assert len(h.collector) == sum(-(-len(t) // 16) for t in reqs)
            assert h.collector.num_evictions == pool.get_stats()["num_evictions"]
        if hasattr(h, "snapshot"):
            snaps.append(h.snapshot())
        if hasattr(h, "events_since"):
            assert h.last_seq > 0  # publishes the batch being built
    dt = time.process_time() - t0
    for snap in snaps:
        assert snap["prefix_cache_hits"] == (len(reqs) - 1) * 1024
    return dt, pool.get_stats()


def main() -> None:
    args = parse_args(__doc__, requests=2000, blocks=8192, repeat=3)
    reqs = make_requests(args.requests)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    stats: dict = {}
    for _ in range(args.repeat):  # interleaved, so drift hits every variant alike
        for name, make in VARIANTS.items():
            dt, stats = run_once(reqs, args.blocks, make)
            times[name].append(dt)
    base = times["no hook"]
    rows = [
        {
            "hooks": name,
            "requests/s": args.requests / min(ts),
            "us/request": min(ts) / args.requests * 1e6,
            "slowdown": statistics.median(t / b for t, b in zip(ts, base)),
            "slowdown (best)": min(ts) / min(base),
        }
        for name, ts in times.items()
    ]
    print_table(
        rows,
        f"hooks: {args.requests} requests x 1536 tokens on {args.blocks:,} blocks "
        f"({stats['num_evictions']:,} evictions per run); slowdown: median over "
        f"{args.repeat} rounds of the ratio to that round's bare pool",
    )
    write_json(
        "hooks",
        {
            "requests": args.requests,
            "blocks": args.blocks,
            "repeat": args.repeat,
            "evictions_per_run": stats["num_evictions"],
            "results": {
                r["hooks"]: {
                    "requests_per_s": r["requests/s"],
                    "us_per_request": r["us/request"],
                    "slowdown": r["slowdown"],
                    "slowdown_best": r["slowdown (best)"],
                }
                for r in rows
            },
        },
    )


if __name__ == "__main__":
    main()
