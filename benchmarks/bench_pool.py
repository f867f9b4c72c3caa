"""Pool benchmark (the core issue's goals).

1. ``alloc`` + ``free`` pairs per second (16-token handles, metadata-only pool).
2. The engine-facing path per request: prompt tokens in (1536 = a shared
   1024-token prefix + 512 random tokens, block 16), ``alloc_with_prefix``
   (sha256 block hashing, prefix lookup, hit blocks taken, the rest
   allocated), ``cache_blocks``, ``free``; 2,000 requests on a 200,000-block
   pool. The issue's reference figures on the same machine: vLLM 0.33 v1
   ``KVCacheManager`` about 6.7M tokens/s, SGLang RadixCache about 5.9M.

3. ``SchedulerBridge.plan`` cost against the number of evictable blocks: a
   device pool full of cached, evictable blocks (1k and 100k), a plan of 8
   requests of 16 new blocks each (every one evicts); goal: flat (100k within
   1.2x of 1k), since a plan peeks only the victims it needs.

    python benchmarks/bench_pool.py [--requests 2000] [--blocks 200000] [--plan-only]
"""

from __future__ import annotations

import random
import time

from _util import parse_args, print_table, write_json

VLLM_TOKENS_PER_S = 6.7e6
SGLANG_TOKENS_PER_S = 5.9e6


def make_requests(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(32000) for _ in range(1024)]
    return [prefix + [rng.randrange(32000) for _ in range(512)] for _ in range(n)]


def alloc_free_pairs(n: int = 200_000) -> float:
    from sagellm_kv_cache.pool import KVPool

    pool = KVPool(num_blocks=4096, block_size=16)
    alloc, free = pool.alloc, pool.free
    t0 = time.perf_counter()
    for _ in range(n):
        free(alloc(16))
    return n / (time.perf_counter() - t0)


def engine_path(reqs, num_blocks: int) -> float:
    from sagellm_kv_cache.pool import KVPool

    pool = KVPool(num_blocks=num_blocks, block_size=16)
    t0 = time.perf_counter()
    for tokens in reqs:
        handle, _ = pool.alloc_with_prefix(tokens)
        pool.cache_blocks(handle)
        pool.free(handle)
    dt = time.perf_counter() - t0
    s = pool.get_stats()
    assert s["prefix_hit_tokens"] == (len(reqs) - 1) * 1024, (
        "every request after the first hits 1024 tokens"
    )
    return dt


def plan_us(num_evictable: int, repeat: int = 300) -> float:
    """Median microseconds of one ``SchedulerBridge.plan`` over ``num_evictable`` blocks."""
    import statistics

    from sagellm_kv_cache.scheduler import SchedRequest, SchedulerBridge

    bs, per = 16, 100
    bridge = SchedulerBridge(num_evictable * bs, block_size=bs)
    for i in range(num_evictable // per):  # fill the pool: every block cached, evictable
        rid = f"f{i}"
        bridge.allocate_request(rid, per * bs, block_hashes=[(i, j) for j in range(per)])
        bridge.free_request(rid)
    assert bridge.pool.get_stats()["free_blocks"] == 0
    reqs = [
        SchedRequest(f"r{k}", 16 * bs, block_hashes=[("new", k, j) for j in range(16)])
        for k in range(8)
    ]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        plan = bridge.plan(reqs)
        times.append(time.perf_counter() - t0)
    assert plan.blocks_to_evict == 8 * 16
    return statistics.median(times) * 1e6


def plan_rows() -> tuple[list[dict], float]:
    small, large = plan_us(1_000), plan_us(100_000)
    ratio = large / small
    rows = [
        {"what": "plan us (8 req x 16 blocks), 1k evictable", "value": small},
        {"what": "plan us (8 req x 16 blocks), 100k evictable", "value": large},
        {"what": "plan cost 100k / 1k (goal <= 1.2)", "value": ratio},
    ]
    return rows, ratio


def main() -> None:
    args = parse_args(
        __doc__, requests=2000, blocks=200_000, plan_only=(False, "only the scheduler plan rows")
    )
    prows, pratio = plan_rows()
    if args.plan_only:
        print_table(prows, "scheduler plan cost vs evictable blocks (median of 300)")
        return
    pairs = max(alloc_free_pairs() for _ in range(3))
    reqs = make_requests(args.requests)
    dt = min(engine_path(reqs, args.blocks) for _ in range(3))
    tokens = args.requests * 1536
    tps = tokens / dt
    rows = [
        {"what": "alloc+free pairs / s", "value": pairs, "reference": "", "ratio": ""},
        {
            "what": "engine path tokens / s",
            "value": tps,
            "reference": "vLLM 0.33 KVCacheManager 6.7M",
            "ratio": f"{tps / VLLM_TOKENS_PER_S:.2f}",
        },
        {
            "what": "engine path tokens / s",
            "value": tps,
            "reference": "SGLang RadixCache 5.9M",
            "ratio": f"{tps / SGLANG_TOKENS_PER_S:.2f}",
        },
        {
            "what": "engine path us / request",
            "value": dt / args.requests * 1e6,
            "reference": "",
            "ratio": "",
        },
        *({"reference": "", "ratio": ""} | r for r in prows),
    ]
    print_table(rows, f"pool: {args.requests} requests x 1536 tokens on {args.blocks:,} blocks")
    write_json(
        "pool",
        {
            "alloc_free_pairs_per_s": pairs,
            "engine_path_tokens_per_s": tps,
            "engine_path_us_per_request": dt / args.requests * 1e6,
            "vllm_reference_tokens_per_s": VLLM_TOKENS_PER_S,
            "sglang_reference_tokens_per_s": SGLANG_TOKENS_PER_S,
            "requests": args.requests,
            "blocks": args.blocks,
            "plan_us_1k_evictable": prows[0]["value"],
            "plan_us_100k_evictable": prows[1]["value"],
            "plan_100k_over_1k": pratio,
        },
    )


if __name__ == "__main__":
    main()
