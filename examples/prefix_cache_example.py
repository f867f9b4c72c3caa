"""A tour of prefix caching with the real API (the seed page points here).

1. ``PrefixCache``: block hashes in, hit blocks out, hit rate.
2. ``KVPool.alloc_with_prefix``: a second request reuses the first one's blocks.
3. ``KVCacheManager.register_prefix`` / ``query_prefix``: the seed's handle-level index.

    python examples/prefix_cache_example.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sagellm_kv_cache import KVCacheManager, KVOffloadManager, KVPool, PrefixCache


def prefix_cache() -> None:
    cache = PrefixCache(block_size=16, max_cached_blocks=100, enable_lru=True)
    system = list(range(32))  # a 2-block system prompt shared by both requests
    h1 = cache.compute_block_hashes(system + list(range(100, 116)))
    cache.insert(h1, [{"block_id": i} for i in range(len(h1))])
    h2 = cache.compute_block_hashes(system + list(range(200, 216)))
    hit_blocks, num_tokens = cache.lookup(h2)
    print(f"[PrefixCache] second prompt reuses {num_tokens} tokens ({len(hit_blocks)} blocks)")
    print(f"[PrefixCache] hit rate {cache.get_stats()['hit_rate']:.1%}")


def pool_reuse() -> None:
    pool = KVPool(num_blocks=64, block_size=16)
    system = list(range(48))
    first, _ = pool.alloc_with_prefix(system + [1000] * 16)
    pool.cache_blocks(first)  # its KV is computed: register its full blocks
    pool.free(first)
    second, _ = pool.alloc_with_prefix(system + [2000] * 16)
    print(
        f"[KVPool] second request: {second.num_cached_tokens} cached tokens of {second.num_tokens}"
    )
    pool.free(second)


def handle_index() -> None:
    mgr = KVCacheManager(KVOffloadManager.from_capacities({"gpu": 32}, block_size=16))
    handle = mgr.alloc(64)
    mgr.register_prefix(list(range(64)), handle)  # pinned while registered
    _, n = mgr.query_prefix(list(range(80)))
    blocks, _ = mgr.get_reused_blocks(list(range(80)))
    print(f"[KVCacheManager] longest registered prefix: {n} tokens, blocks {blocks}")
    print(f"[KVCacheManager] metrics {mgr.get_prefix_metrics()}")
    mgr.unregister_prefix(handle)
    mgr.pool.free(handle)


if __name__ == "__main__":
    prefix_cache()
    pool_reuse()
    handle_index()
