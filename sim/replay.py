"""Sequential trace replay through the library's block pool (metadata-only).

Each request, in arrival order, is looked up, allocated, cached and released
before the next arrives (the setting published hit ratios use). Semantics:

* a request's blocks are its *full* blocks: the first ``input_length // block_size``
  hash ids; the partial tail block is not cached and takes no capacity here;
* one block per hash; a request hits its leading run of cached blocks, which
  stay in use until it is released; blocks are released tail-first;
* ``token_hit_ratio`` = hit blocks x block_size / sum of ``input_length``,
  ``block_hit_ratio`` = hit blocks / full blocks, ``request_hit_ratio`` =
  requests with at least one hit block / requests.

The loop drives ``sagellm_kv_cache.block_pool.BlockPool`` directly (the same
mechanism ``KVPool`` wraps, minus per-request handle objects) so that a replay
costs close to a bare dictionary loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sagellm_kv_cache.block_pool import BlockPool

__all__ = ["ReplayResult", "hit_ratio_curve", "replay_sequential"]


@dataclass
class ReplayResult:
    capacity_blocks: int
    policy: str
    block_size: int
    num_requests: int
    token_hit_ratio: float
    block_hit_ratio: float
    request_hit_ratio: float
    hit_blocks: int
    full_blocks: int
    prompt_tokens: int
    evictions: int
    records: dict  # column name -> numpy array, one row per request

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("records")
        return d


def replay_sequential(
    table, capacity_blocks: int | None, policy: str = "lru", *, progress: bool = False
) -> ReplayResult:
    """Replay a canonical trace table sequentially at ``capacity_blocks`` (None: infinite).

    Infinite capacity uses a pool as large as the trace's distinct blocks, which
    never evicts.
    """
    hashes_col = table["block_hashes"].to_list()
    lengths = table["input_length"].to_list()
    block_size = int(table["block_size"][0]) if len(table) else 512
    if capacity_blocks is None:
        capacity_blocks = max(1, len({h for hs in hashes_col for h in hs}))
    n = len(lengths)
    hit_arr = np.zeros(n, dtype=np.int64)
    full_arr = np.zeros(n, dtype=np.int64)
    evict_arr = np.zeros(n, dtype=np.int64)
    bp = BlockPool(capacity_blocks, block_size, policy)
    match, touch, allocate, cache, release = (
        bp.match_prefix,
        bp.touch,
        bp.allocate,
        bp.cache_blocks,
        bp.release,
    )
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"replay {policy} @ {capacity_blocks} blocks", unit="req")
    for i in it:
        full = lengths[i] // block_size
        if not full:
            continue
        hs = hashes_col[i][:full]
        if full > capacity_blocks:  # never fits: counted as a miss, nothing cached
            full_arr[i] = full
            continue
        hit = match(hs)
        before = bp.num_evictions
        if hit:
            touch(hit)
        ids = hit + allocate(full - len(hit))
        cache(ids, hs, len(hit))
        release(ids)
        hit_arr[i] = len(hit)
        full_arr[i] = full
        evict_arr[i] = bp.num_evictions - before
    hit_blocks = int(hit_arr.sum())
    full_blocks = int(full_arr.sum())
    prompt_tokens = int(sum(lengths))
    return ReplayResult(
        capacity_blocks=capacity_blocks,
        policy=policy,
        block_size=block_size,
        num_requests=n,
        token_hit_ratio=hit_blocks * block_size / prompt_tokens if prompt_tokens else 0.0,
        block_hit_ratio=hit_blocks / full_blocks if full_blocks else 0.0,
        request_hit_ratio=float((hit_arr > 0).mean()) if n else 0.0,
        hit_blocks=hit_blocks,
        full_blocks=full_blocks,
        prompt_tokens=prompt_tokens,
        evictions=bp.num_evictions,
        records={
            "request_id": np.asarray(table["request_id"].to_list(), dtype=object),
            "arrival_s": table["arrival_s"].to_numpy(),
            "input_length": np.asarray(lengths, dtype=np.int64),
            "full_blocks": full_arr,
            "hit_blocks": hit_arr,
            "hit_tokens": hit_arr * block_size,
            "evicted_blocks": evict_arr,
        },
    )


def hit_ratio_curve(table, capacities, policies=("lru",), *, progress: bool = True) -> list[dict]:
    """Direct sequential replays at each capacity x policy, plus the infinite bound."""
    from tqdm import tqdm

    rows = []
    jobs = [(p, c) for p in policies for c in capacities] + [("infinite", None)]
    for policy, cap in tqdm(jobs, desc="hit-ratio curve", unit="replay", disable=not progress):
        r = replay_sequential(table, cap, "lru" if policy == "infinite" else policy)
        rows.append(
            {
                "policy": policy,
                "capacity_blocks": r.capacity_blocks,
                "token_hit_ratio": r.token_hit_ratio,
                "block_hit_ratio": r.block_hit_ratio,
                "request_hit_ratio": r.request_hit_ratio,
            }
        )
    return rows
