"""A realistic access workload driven through the real ``PrefixCache`` (a workload
generator of the workbench, not part of the library).

Used by ``sage-kv-stats demo`` and the notebooks. The workload::

    system prompts  S0 S1 S2 S3         (4..12 blocks each, Zipf popularity)
    session         [S_k | user_1]                         turn 1
                    [S_k | user_1 | reply_1 | user_2]      turn 2 (context grows)
                    ...                                    up to max turns

Each request looks up its whole context in the prefix cache; one access is
recorded per block of the context: hits for the leading cached run (the
shared system prompt, the session's earlier turns), misses for the rest,
which are then inserted. Arrivals are Poisson on a simulated clock, so the
timestamps are seconds of simulated time.

A block id names a block's content (one id per block hash), so a block that
was evicted and is missed again keeps its id: unique blocks count distinct
content, misses count cold and capacity misses, and every block the cache
evicts is recorded as an eviction (reason ``"capacity"``) at the time of the
insert that pushed it out.
"""

from __future__ import annotations

import numpy as np

from sagellm_kv_cache.prefix_cache import PrefixCache
from sagellm_kv_cache.profiling import AccessStatsCollector

__all__ = ["run_demo_workload"]

#: bytes of K and V per token of a nominal 32-layer, 8-KV-head, 128-dim, fp16 model
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2


def run_demo_workload(
    num_accesses: int = 1000,
    *,
    seed: int = 0,
    block_size: int = 16,
    max_cached_blocks: int = 512,
    num_system_prompts: int = 4,
    request_rate_per_s: float = 2.0,
    collector: AccessStatsCollector | None = None,
) -> AccessStatsCollector:
    """Drive a multi-turn chat workload through a ``PrefixCache`` and record every block access.

    Args:
        num_accesses: stop after exactly this many recorded accesses.
        seed: seed of the random generator (same seed, same accesses).
        block_size: tokens per block.
        max_cached_blocks: capacity of the prefix cache (LRU beyond it).
        num_system_prompts: distinct shared system prompts (Zipf popularity).
        request_rate_per_s: mean Poisson arrival rate on the simulated clock.
        collector: where to record (a new one if omitted).

    Returns:
        The collector: block ids are ints, timestamps simulated seconds,
        request ids ``"s<session>-t<turn>"``, positions block indices in
        the prompt, tier ``"gpu"``.
    """
    if num_accesses < 0:
        raise ValueError(f"num_accesses must be >= 0, got {num_accesses}")
    rng = np.random.default_rng(seed)
    collector = AccessStatsCollector() if collector is None else collector
    cache = PrefixCache(block_size=block_size, max_cached_blocks=max_cached_blocks, enable_lru=True)
    vocab = 32_000
    block_bytes = block_size * KV_BYTES_PER_TOKEN

    def random_tokens(min_blocks: int, max_blocks: int) -> list[int]:
        n_blocks = int(rng.integers(min_blocks, max_blocks + 1))
        extra = int(rng.integers(0, block_size))  # turns rarely end on a block boundary
        return rng.integers(0, vocab, size=n_blocks * block_size + extra).tolist()

    system_prompts = [random_tokens(4, 12) for _ in range(num_system_prompts)]
    zipf = 1.0 / np.arange(1, num_system_prompts + 1) ** 1.2
    zipf /= zipf.sum()

    sessions: dict[int, dict] = {}  # session id -> {"context": tokens, "turn": n, "max_turns": m}
    next_session = 0
    block_of: dict[bytes, int] = {}  # block hash -> block id (content identity)
    cached: dict[bytes, None] = {}  # hashes inserted and not yet seen evicted (ordered)
    now = 0.0
    recorded = 0
    while recorded < num_accesses:
        now += float(rng.exponential(1.0 / request_rate_per_s))
        if not sessions or rng.random() < 0.35:
            sid = next_session
            next_session += 1
            prompt = system_prompts[int(rng.choice(num_system_prompts, p=zipf))]
            sessions[sid] = {
                "context": prompt + random_tokens(1, 6),
                "turn": 1,
                "max_turns": int(rng.integers(2, 7)),
            }
        else:
            sid = int(rng.choice(list(sessions)))
            s = sessions[sid]
            s["context"] = (
                s["context"] + random_tokens(1, 3) + random_tokens(1, 4)
            )  # reply, then user turn
            s["turn"] += 1
        session = sessions[sid]
        request_id = f"s{sid}-t{session['turn']}"
        hashes = cache.compute_block_hashes(session["context"])
        hashes = hashes[:max_cached_blocks]  # a prompt longer than the cache is truncated
        hit_blocks, _ = cache.lookup(hashes)
        num_hit = len(hit_blocks)
        new_blocks = [{"block_id": block_of.setdefault(h, len(block_of))} for h in hashes[num_hit:]]
        blocks = list(hit_blocks) + new_blocks
        n = min(len(blocks), num_accesses - recorded)
        if n:
            positions = np.arange(n)
            collector.record_many(
                np.asarray([b["block_id"] for b in blocks[:n]], dtype=np.int64),
                positions < num_hit,
                timestamps=now,
                request_ids=request_id,
                positions=positions,
                tiers="gpu",
                size_bytes=block_bytes,
            )
            recorded += n
        if blocks:
            cache.insert(hashes, blocks)
            cached.update(dict.fromkeys(hashes))
            if len(cache) < len(cached):  # the insert evicted: find what went
                gone = [h for h in cached if h not in cache]
                for h in gone:
                    del cached[h]
                collector.record_evictions(
                    [block_of[h] for h in gone], "capacity", timestamp=now, block_hashes=gone
                )
        if session["turn"] >= session["max_turns"]:
            del sessions[sid]
    return collector
