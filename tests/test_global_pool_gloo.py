"""The global pool across two processes on 127.0.0.1 (gloo): a prefix cached on
node A (rank 0) is hit by a request on node B (rank 1) through a real transfer.

Ranks are started with ``sagellm_kv_cache.testing.launcher.launch``, which ends every process
it started; every wait below has a timeout.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from sagellm_kv_cache.errors import KVChecksumMismatchError, KVTransferTimeoutError
from sagellm_kv_cache.observability.event_json import events_from_jsonl, events_to_jsonl
from sagellm_kv_cache.observability.events import KVEventStream
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.pooling import GlobalKVPoolManager, NodeContribution, RemoteKVAccessor
from sagellm_kv_cache.testing.faults import inject_faults
from sagellm_kv_cache.testing.launcher import launch
from sagellm_kv_cache.transfer import KVTransferEngine
from tests._transfer_harness import BS, SHAPE, accounting, digest, prompt

pytestmark = pytest.mark.timeout(120)


def rank_global_pool(ctx):
    pool = KVPool(num_blocks=64, block_size=BS, model_shape=SHAPE)
    eng = KVTransferEngine("torch", timeout_s=15, max_retries=0, chunk_bytes=2 * 512)
    if ctx.rank == 0:  # node A: caches prompts 1 and 3, answers B's fetches
        stream = KVEventStream(pool)  # A's own KV events feed B's directory
        pool.add_hook(stream)
        digests = {}
        for i in (1, 2, 3):
            h, _ = pool.alloc_with_prefix(prompt(i))
            g = torch.Generator().manual_seed(i)
            kv = torch.randn(SHAPE.num_layers, 2, 26, 2, 8, generator=g).half()
            pool.write_kv(h, kv)
            pool.cache_blocks(h)
            pool.free(h)
            digests[i] = digest(kv[:, :, :24])
        ctx.store.set("a_events", events_to_jsonl(stream.events_since(0)).encode())
        pool.invalidate(pool.compute_block_hashes(prompt(2)))  # B's entry for 2 goes stale
        acc = RemoteKVAccessor(eng, pool, timeout_s=15)
        before = accounting(pool)
        served = acc.serve(num_requests=2, idle_timeout_s=30)  # the hit and the stale one

        def corrupt(stage, chunk=None, index=None, **_):  # flip a bit after hashing
            if stage == "chunk_sent" and index == 1:
                chunk[3] ^= 0x10

        inject_faults(eng, corrupt)
        served += acc.serve(num_requests=1, idle_timeout_s=30)
        ctx.store.wait(["b_done"], timedelta(seconds=60))
        return {"digests": digests, "served": served, "before": before, "after": accounting(pool)}
    # node B: a global pool whose node 0 lives in the other process
    mgr = GlobalKVPoolManager(
        [NodeContribution(0), NodeContribution(1, pool)], engine=eng, timeout_s=15
    )
    out = {"start": accounting(pool)}
    hashes = {i: pool.compute_block_hashes(prompt(i)) for i in (1, 2, 3)}
    ctx.store.wait(["a_events"], timedelta(seconds=60))  # A's KV events, as JSON lines
    last = mgr.directory.apply_events(
        0, events_from_jsonl(bytes(ctx.store.get("a_events")).decode())
    )
    out["fed"] = (last, [mgr.locate(hashes[i]) for i in (1, 2, 3)])  # 2 is stale by now
    out["remote_before"] = mgr.accessor.is_remote(hashes[1], 1)
    h, hit = mgr.alloc_with_prefix(prompt(1), node_rank=1)
    out["hit"] = (hit, h.metadata["remote_hit_tokens"])
    out["kv"] = digest(pool.read_kv(h, num_tokens=hit))
    mgr.free(h)
    out["after_hit"] = accounting(pool)
    res = mgr.accessor.fetch(hashes[2], 1)  # A never had it: a miss, not an error
    out["stale"] = (res.hit, res.num_blocks, mgr.locate(hashes[2]))
    out["after_stale"] = accounting(pool)
    try:
        mgr.accessor.fetch(hashes[3], 1)
        out["fail"] = None
    except KVChecksumMismatchError as exc:
        out["fail"] = exc.code
    out["after_fail"] = accounting(pool)
    out["visible_3"] = pool.match_prefix(prompt(3))[1]
    try:  # A no longer serves: the wait ends at the timeout, typed
        mgr.accessor.fetch(hashes[3], 1, timeout_s=1.0)
        out["timeout"] = None
    except KVTransferTimeoutError as exc:
        out["timeout"] = exc.code
    out["after_timeout"] = accounting(pool)
    out["stats"] = mgr.accessor.get_stats()
    ctx.store.set("b_done", b"1")
    return out


def test_block_cached_on_a_is_hit_on_b_through_a_real_transfer_all_or_nothing():
    results = launch(rank_global_pool, 2, timeout_s=100)
    for r in results:
        assert r.ok, f"rank {r.rank}: {r.status} {r.error}"
    a, b = results[0].value, results[1].value
    # the hit: 6 full blocks, A's bytes exactly, now cached and evictable on B
    assert b["fed"] == (3, [(0, 6), (0, 6), (0, 6)])  # three BlockStored, one per prompt
    assert b["remote_before"] is True
    assert b["hit"] == (24, 24) and b["kv"] == a["digests"][1]
    assert b["after_hit"] == {
        "free_blocks": 58,
        "used_blocks": 0,
        "cached_blocks": 6,
        "num_handles": 0,
    }
    # stale directory entry: a miss, B unchanged, the entries gone
    assert b["stale"] == (False, 0, (None, 0)) and b["after_stale"] == b["after_hit"]
    # a corrupted transfer: typed error, B exactly as before, nothing visible
    assert b["fail"] == KVChecksumMismatchError.code
    assert b["after_fail"] == b["after_hit"] and b["visible_3"] == 0
    assert b["timeout"] == KVTransferTimeoutError.code and b["after_timeout"] == b["after_hit"]
    assert (b["stats"]["hits"], b["stats"]["misses"], b["stats"]["failed"]) == (1, 1, 2)
    # A: answered three requests (6 blocks, a miss, 6 blocks that failed), lent and got back
    assert [(s["num_blocks"], s["error_code"]) for s in a["served"]] == [
        (6, None),
        (0, None),
        (6, KVChecksumMismatchError.code),
    ]
    assert a["after"] == a["before"]
