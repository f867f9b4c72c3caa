"""GlobalKVPoolManager, RemoteKVAccessor and KVTransferPipeline on in-process pools."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

from sagellm_kv_cache.errors import (
    KVBudgetExceededError,
    KVChecksumMismatchError,
    KVConfigError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVTransferTimeoutError,
)
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.pooling import (
    BlockDirectory,
    GlobalKVPoolManager,
    KVTransferPipeline,
    NodeContribution,
    RemoteKVAccessor,
)
from sagellm_kv_cache.storage import ModelShape
from sagellm_kv_cache.testing.faults import inject_faults
from sagellm_kv_cache.transfer import KVTransferEngine

pytestmark = pytest.mark.timeout(60)

SHAPE = ModelShape(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
BS = 4


def make_pool(num_blocks: int = 32) -> KVPool:
    return KVPool(num_blocks=num_blocks, block_size=BS, model_shape=SHAPE)


def prompt(i: int, n: int = 26) -> list[int]:
    return [i * 1000 + t for t in range(n)]


def fill(pool: KVPool, tokens: list[int], seed: int, free: bool = True):
    h, _ = pool.alloc_with_prefix(tokens)
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(SHAPE.num_layers, 2, len(tokens), 2, 8, generator=g).half()
    pool.write_kv(h, kv)
    pool.cache_blocks(h)
    if free:
        pool.free(h)
    return kv


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def acct(pool: KVPool) -> dict:
    pool.check_invariants()
    s = pool.get_stats()
    return {k: s[k] for k in ("free_blocks", "used_blocks", "cached_blocks", "num_handles")}


def snapshot(mgr: GlobalKVPoolManager) -> dict:
    s = mgr.get_global_stats()
    s.pop("remote")
    return {"global": s, "pools": {r: acct(mgr.contribution(r).pool) for r in mgr.node_ranks}}


def two_nodes(num_blocks: int = 32, **kw) -> tuple[GlobalKVPoolManager, KVPool, KVPool]:
    a, b = make_pool(num_blocks), make_pool(num_blocks)
    mgr = GlobalKVPoolManager([NodeContribution(0, a), NodeContribution(1, b)], **kw)
    return mgr, a, b


# -- directory -------------------------------------------------------------------------
def test_directory_follows_the_pools_cache_and_eviction_events():
    mgr, a, b = two_nodes(num_blocks=8)
    hashes = a.compute_block_hashes(prompt(1))  # 6 full blocks
    fill(a, prompt(1), seed=1)
    assert [mgr.directory.holders(h) for h in hashes] == [[0]] * 6
    assert mgr.locate(hashes) == (0, 6)
    assert mgr.directory.num_blocks(0) == 6 and mgr.directory.num_blocks(1) == 0
    # a 7-block request on A (2 free) evicts 5 cached blocks, the tail first: they
    # leave the directory, the first block stays
    h = a.alloc(7 * BS)
    assert [mgr.directory.holders(x) for x in hashes] == [[0]] + [[]] * 5
    assert mgr.locate(hashes) == (0, 1) and len(mgr.directory) == 1
    a.free(h)
    fill(a, prompt(2), seed=2)
    a.reset()  # on_cleared
    assert len(mgr.directory) == 0
    mgr.close()
    assert a.hooks == [] and b.hooks == []


def test_directory_is_seeded_with_what_a_pool_already_caches_and_invalidation_removes():
    a, b = make_pool(), make_pool()
    fill(a, prompt(3), seed=3)
    mgr = GlobalKVPoolManager([NodeContribution(0, a), NodeContribution(1, b)])
    hashes = a.compute_block_hashes(prompt(3))
    assert mgr.locate(hashes) == (0, 6)
    a.invalidate(hashes[4:])
    assert mgr.locate(hashes) == (0, 4)


def test_directory_fed_by_another_nodes_kv_events_in_order_gaps_refused():
    from sagellm_kv_cache.errors import KVEventGapError
    from sagellm_kv_cache.observability.event_json import events_from_jsonl, events_to_jsonl
    from sagellm_kv_cache.observability.events import KVEventStream

    a = make_pool(num_blocks=8)  # "another process": only its events reach the directory
    stream = KVEventStream(a)
    a.add_hook(stream)
    d = BlockDirectory()
    hashes = a.compute_block_hashes(prompt(1))
    fill(a, prompt(1), seed=1)
    assert d.apply_events(0, events_from_jsonl(events_to_jsonl(stream.events_since(0)))) == 1
    assert d.longest_prefix(hashes) == (0, 6) and d.num_blocks(0) == 6
    h = a.alloc(7 * BS)  # evicts 5 blocks tail first: BlockRemoved
    a.free(h)
    fill(a, prompt(2), seed=2)  # evicts the 6th, stores 6 of prompt 2
    a.reset()  # AllBlocksCleared
    events = stream.events_since(1)
    kinds = [e.type for e in events]
    assert kinds[0] == "block_removed" and kinds[-1] == "all_blocks_cleared"
    before = (d.longest_prefix(hashes), len(d))
    with pytest.raises(KVEventGapError) as ei:  # the first removal lost: nothing applied
        d.apply_events(0, events[1:])
    assert ei.value.code == "KV_EVENT_GAP" and (d.longest_prefix(hashes), len(d)) == before
    with pytest.raises(KVInvalidTypeError):
        d.apply_events(0, [events[0], "not an event"])
    assert (d.longest_prefix(hashes), len(d)) == before
    assert d.apply_events(0, events[:1]) == 2
    assert d.longest_prefix(hashes) == (0, 1)
    assert d.apply_events(0, events[1:-1]) == events[-2].seq
    assert d.longest_prefix(a.compute_block_hashes(prompt(2))) == (0, 6)
    assert d.apply_events(0, events[-1:]) == events[-1].seq and len(d) == 0


def test_block_directory_longest_prefix_prefers_longest_then_lowest_rank():
    d = BlockDirectory()
    d.add(2, [b"a", b"b", b"c"])
    d.add(1, [b"a", b"b"])
    d.add(0, [b"b"])
    assert d.longest_prefix([b"a", b"b", b"c", b"d"]) == (2, 3)
    assert d.longest_prefix([b"a", b"b"]) == (1, 2)
    assert d.longest_prefix([b"a", b"b", b"c"], exclude=[2]) == (1, 2)
    assert d.longest_prefix([b"x"]) == (None, 0)
    d.discard(2, [b"c"])
    assert d.longest_prefix([b"a", b"b", b"c"]) == (1, 2)
    assert d.num_blocks(2) == 2 and len(d) == 2


# -- remote fetch (in-process) ---------------------------------------------------------------
def test_request_on_b_hits_the_prefix_cached_on_a_bit_exact():
    mgr, a, b = two_nodes()
    kv = fill(a, prompt(1), seed=1)
    a_before = acct(a)
    h, hit = mgr.alloc_with_prefix(prompt(1), node_rank=1)
    assert hit == 24 and h.metadata["remote_hit_tokens"] == 24 and h.node_rank == 1
    assert digest(b.read_kv(h, num_tokens=24)) == digest(kv[:, :, :24])
    # A lent its blocks for the copy and has them back, cached and evictable
    assert acct(a) == a_before
    # both nodes now hold the prefix
    assert mgr.directory.holders(a.compute_block_hashes(prompt(1))[0]) == [0, 1]
    mgr.free(h)
    assert acct(b) == {"free_blocks": 26, "used_blocks": 0, "cached_blocks": 6, "num_handles": 0}
    st = mgr.accessor.get_stats()
    assert (st["fetches"], st["hits"], st["blocks"]) == (1, 1, 6)


def test_fetch_takes_only_the_longer_remote_run_and_reports_local_blocks():
    mgr, a, b = two_nodes()
    fill(a, prompt(1), seed=1)
    fill(b, prompt(1)[:8], seed=9)  # B has the first 2 blocks (its own bytes)
    b_kv = b.read_kv(b.alloc_with_prefix(prompt(1)[:8])[0], num_tokens=8)
    hashes = a.compute_block_hashes(prompt(1))
    assert mgr.accessor.is_remote(hashes, 1) is True
    res = mgr.accessor.fetch(hashes, 1)
    assert (res.src_rank, res.num_blocks, res.local_blocks, res.num_tokens) == (0, 6, 2, 24)
    # B kept its own first two blocks (a hash already cached keeps its block)
    h, hit = b.alloc_with_prefix(prompt(1))
    assert hit == 24 and digest(b.read_kv(h, num_tokens=8)) == digest(b_kv)
    assert mgr.accessor.is_remote(hashes, 1) is False


def test_stale_directory_entry_is_a_miss_and_leaves_both_pools_unchanged():
    mgr, a, _b = two_nodes()
    hashes = a.compute_block_hashes(prompt(1))
    mgr.directory.add(0, hashes)  # a remote feed that A never had (or evicted meanwhile)
    before = snapshot(mgr)
    res = mgr.accessor.fetch(hashes, 1)
    assert (res.hit, res.num_blocks, res.src_rank) == (False, 0, 0)
    assert snapshot(mgr)["pools"] == before["pools"]
    assert mgr.locate(hashes) == (None, 0)  # the stale entries left
    assert mgr.accessor.get_stats()["stale"] == 1
    h, hit = mgr.alloc_with_prefix(prompt(1), node_rank=1)
    assert hit == 0 and h.metadata["remote_hit_tokens"] == 0


def test_failed_transfer_raises_typed_and_leaves_b_unchanged():
    eng = KVTransferEngine("inprocess", max_retries=0)
    mgr, a, b = two_nodes(engine=eng)
    fill(a, prompt(1), seed=1)

    def corrupt(stage, chunk=None, index=None, **_):
        if stage == "local_chunk" and index == 0:
            chunk.view(-1)[0] ^= 1

    inject_faults(eng, corrupt)
    before = snapshot(mgr)
    with pytest.raises(KVChecksumMismatchError) as ei:
        mgr.alloc_with_prefix(prompt(1), node_rank=1)
    assert ei.value.code == "KV_CHECKSUM_MISMATCH"
    assert snapshot(mgr) == before
    assert b.match_prefix(prompt(1)) == ([], 0)
    assert mgr.accessor.get_stats()["failed"] == 1


def test_fetch_with_no_room_on_b_is_typed_and_changes_nothing():
    a, b = make_pool(32), make_pool(4)
    mgr = GlobalKVPoolManager([NodeContribution(0, a), NodeContribution(1, b)])
    fill(a, prompt(1), seed=1)
    before = snapshot(mgr)
    with pytest.raises(KVBudgetExceededError) as ei:
        mgr.accessor.fetch(a.compute_block_hashes(prompt(1)), 1)
    assert ei.value.code == KVBudgetExceededError.code
    assert snapshot(mgr) == before


def test_prefetch_returns_a_future_of_the_fetch():
    mgr, a, b = two_nodes()
    kv = fill(a, prompt(4), seed=4)
    fut = mgr.accessor.prefetch(a.compute_block_hashes(prompt(4)), 1)
    res = fut.result(timeout=30)
    assert res.num_blocks == 6
    h, hit = b.alloc_with_prefix(prompt(4))
    assert hit == 24 and digest(b.read_kv(h, num_tokens=24)) == digest(kv[:, :, :24])
    mgr.close()


def test_is_remote_for_handles_follows_node_rank():
    mgr, _a, _b = two_nodes()
    h = mgr.alloc(8, preferred_node=0)
    assert mgr.accessor.is_remote(h, 1) is True and mgr.accessor.is_remote(h, 0) is False


# -- alloc / free / get / stats / rebalance ------------------------------------------------
def test_alloc_routes_to_preferred_node_else_the_one_with_most_room():
    a, b = make_pool(16), make_pool(16)
    mgr = GlobalKVPoolManager(
        [NodeContribution(0, a, contributed_blocks=4), NodeContribution(1, b, contributed_blocks=8)]
    )
    h1 = mgr.alloc(16, preferred_node=0)  # 4 blocks: fits node 0 exactly
    assert h1.node_rank == 0
    h2 = mgr.alloc(4, preferred_node=0)  # node 0's contribution is spent: node 1
    assert h2.node_rank == 1
    h3 = mgr.alloc(4)  # node 1 has 7 left, node 0 none
    assert h3.node_rank == 1
    s = mgr.get_global_stats()
    assert s["total_capacity_tokens"] == 48 and s["allocated_tokens"] == 24
    assert s["per_node_stats"][0]["global_held_tokens"] == 16
    before = snapshot(mgr)
    with pytest.raises(KVBudgetExceededError):
        mgr.alloc(7 * BS)  # 7 blocks: node 1 has 6 left of its contribution
    assert snapshot(mgr) == before
    kv = torch.ones(SHAPE.num_layers, 2, 4, 2, 8, dtype=torch.float16)
    b.write_kv(h2, kv)
    assert torch.equal(mgr.get(h2, current_rank=0), kv)
    for h in (h1, h2, h3):
        mgr.free(h)
    assert mgr.get_global_stats()["allocated_tokens"] == 0


def test_ties_go_to_the_lowest_rank():
    mgr, _a, _b = two_nodes()
    assert mgr.alloc(4).node_rank == 0


def test_rebalance_moves_cached_chains_from_the_fullest_node_bit_exact():
    mgr, a, b = two_nodes(num_blocks=16)
    kvs = [fill(a, prompt(i, 16), seed=i) for i in range(3)]  # 12 cached blocks on A
    moves = mgr.rebalance(tolerance=0.25)
    # occupancy 12/16 vs 0/16: move one 4-block chain (8/16 vs 4/16 is within 0.25)
    assert moves == [{"src": 0, "dst": 1, "num_blocks": 4}]
    assert acct(a)["cached_blocks"] == 8 and acct(b)["cached_blocks"] == 4
    h, hit = b.alloc_with_prefix(prompt(0, 16))
    assert hit == 16 and digest(b.read_kv(h)) == digest(kvs[0])
    assert a.match_prefix(prompt(0, 16))[1] == 0
    assert mgr.rebalance(tolerance=0.25) == []


# -- bad input: typed errors, nothing changed ------------------------------------------------
BAD_MANAGER = [
    ("alloc-neg", lambda m, a, b: m.alloc(-1), KVInvalidInputError),
    ("alloc-bool", lambda m, a, b: m.alloc(True), KVInvalidTypeError),
    ("alloc-unknown-node", lambda m, a, b: m.alloc(4, preferred_node=7), KVInvalidInputError),
    ("alloc-str-node", lambda m, a, b: m.alloc(4, preferred_node="0"), KVInvalidTypeError),
    ("alloc-metadata", lambda m, a, b: m.alloc(4, metadata=[1]), KVInvalidTypeError),
    ("free-foreign", lambda m, a, b: m.free(a.alloc(4)), KVInvalidHandleError),
    ("free-not-handle", lambda m, a, b: m.free("h"), KVInvalidTypeError),
    ("get-foreign", lambda m, a, b: m.get(b.alloc(4)), KVInvalidHandleError),
    (
        "prefix-unknown-node",
        lambda m, a, b: m.alloc_with_prefix([1], node_rank=5),
        KVInvalidInputError,
    ),
    ("fetch-bad-hashes", lambda m, a, b: m.accessor.fetch("abc", 1), KVInvalidTypeError),
    ("fetch-none-hash", lambda m, a, b: m.accessor.fetch([None], 1), KVInvalidInputError),
    ("fetch-bad-rank", lambda m, a, b: m.accessor.fetch([b"x"], -1), KVInvalidInputError),
    ("fetch-no-pool", lambda m, a, b: m.accessor.fetch([b"x"], 9), KVConfigError),
    ("fetch-self", lambda m, a, b: m.accessor.fetch([b"x"], 1, src_rank=1), KVInvalidInputError),
    ("fetch-timeout", lambda m, a, b: m.accessor.fetch([b"x"], 1, timeout_s=0), KVConfigError),
    ("prefetch-bad", lambda m, a, b: m.accessor.prefetch(5, 1), KVInvalidTypeError),
    ("rebalance-tol", lambda m, a, b: m.rebalance(tolerance=2), KVConfigError),
    ("rebalance-max", lambda m, a, b: m.rebalance(max_blocks=-1), KVInvalidInputError),
]


@pytest.mark.parametrize(("name", "call", "exc"), BAD_MANAGER, ids=[r[0] for r in BAD_MANAGER])
def test_bad_input_is_typed_and_changes_nothing(name, call, exc):
    mgr, a, b = two_nodes()
    fill(a, prompt(1), seed=1)
    keep = mgr.alloc(8, preferred_node=1)
    before = snapshot(mgr)
    d_before = len(mgr.directory)
    with pytest.raises(exc) as ei:
        call(mgr, a, b)
    assert ei.value.code == exc.code
    if name.startswith(("free-foreign", "get-foreign")):  # the test's own foreign handle
        for p in (a, b):
            for h in p.handles:
                if h.handle_id != keep.handle_id:
                    p.free(h)
    assert snapshot(mgr) == before and len(mgr.directory) == d_before


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"node_rank": -1}, KVInvalidInputError),
        ({"node_rank": 0, "contributed_memory_gb": -1}, KVConfigError),
        ({"node_rank": 0, "total_memory_gb": 1, "contributed_memory_gb": 2}, KVConfigError),
        ({"node_rank": 0, "pool": "p"}, KVInvalidTypeError),
        ({"node_rank": 0, "contributed_blocks": 1.5}, KVConfigError),
        ({"node_rank": 0, "storage_tiers": "gpu"}, KVInvalidTypeError),
    ],
)
def test_node_contribution_validates(kwargs, exc):
    with pytest.raises(exc):
        NodeContribution(**kwargs)


def test_manager_construction_validates():
    a = make_pool()
    with pytest.raises(KVInvalidInputError):
        GlobalKVPoolManager([])
    with pytest.raises(KVConfigError):
        GlobalKVPoolManager([NodeContribution(0, a), NodeContribution(0, make_pool())])
    with pytest.raises(KVConfigError):
        GlobalKVPoolManager([NodeContribution(0, a), NodeContribution(1, a)])
    other = KVPool(num_blocks=8, block_size=8, model_shape=SHAPE)
    with pytest.raises(KVConfigError):
        GlobalKVPoolManager([NodeContribution(0, a), NodeContribution(1, other)])
    assert a.hooks == []  # a refused manager attached nothing


def test_seed_contribution_example_and_gib_conversion():
    c = NodeContribution(
        node_rank=0, total_memory_gb=100, contributed_memory_gb=40, reserved_memory_gb=60,
        storage_tiers=["gpu", "cpu"],
    )  # fmt: skip
    assert c.pool is None and c.contributed_blocks is None
    pool = make_pool(64)  # 512 bytes per block
    c = NodeContribution(0, pool, contributed_memory_gb=4096 / (1 << 30))
    assert c.contributed_blocks == 8


# -- pipeline ----------------------------------------------------------------------------------
def test_pipeline_moves_handles_and_counts():
    a, b = make_pool(), make_pool()
    eng = KVTransferEngine("inprocess")
    eng.register_pool(a, 0)
    eng.register_pool(b, 1)
    handles, kvs = [], []
    for i in range(3):
        kvs.append(fill(a, prompt(i, 8), seed=i, free=False))
        handles.append(a.handles[-1])
    done = []
    with KVTransferPipeline(eng, max_inflight=2, timeout_s=30) as pipe:
        futs = [pipe.submit(h, 0, 1, on_done=lambda t, e: done.append((t, e))) for h in handles]
        ids = pipe.wait_all()
        assert sorted(ids) == sorted(f.result(timeout=1) for f in futs)
        assert pipe.pending_count() == 0
        st = pipe.get_stats()
        assert (st["submitted"], st["completed"], st["failed"], st["in_flight"]) == (3, 3, 0, 0)
    assert sorted(t for t, _ in done) == sorted(ids) and all(e is None for _, e in done)
    for i in range(3):
        h, hit = b.alloc_with_prefix(prompt(i, 8))
        assert hit == 8 and digest(b.read_kv(h)) == digest(kvs[i])
    with pytest.raises(KVConfigError):
        pipe.submit(handles[0], 0, 1)
    eng.close()


def test_pipeline_bounds_in_flight_and_times_out_typed():
    a, b = make_pool(), make_pool()
    eng = KVTransferEngine("inprocess")
    eng.register_pool(a, 0)
    eng.register_pool(b, 1)
    fill(a, prompt(1, 8), seed=1, free=False)
    fill(a, prompt(2, 8), seed=2, free=False)
    h1, h2 = a.handles
    gate = threading.Event()
    inject_faults(eng, lambda stage, **_: gate.wait(10))
    pipe = KVTransferPipeline(eng, max_inflight=1, timeout_s=30)
    pipe.submit(h1, 0, 1)
    with pytest.raises(KVTransferTimeoutError) as ei:
        pipe.submit(h2, 0, 1, timeout_s=0.05)  # the only slot is taken
    assert ei.value.code == KVTransferTimeoutError.code
    with pytest.raises(KVTransferTimeoutError):
        pipe.wait_all(timeout=0.05)
    assert pipe.get_stats()["rejected"] == 1 and pipe.pending_count() == 1
    gate.set()
    assert len(pipe.wait_all(timeout=30)) == 1
    assert pipe.get_stats()["submitted"] == 1
    with pytest.raises(KVInvalidTypeError):
        pipe.submit("h", 0, 1)
    with pytest.raises(KVInvalidInputError):
        pipe.submit(h2, 0, -1)
    with pytest.raises(KVConfigError):
        KVTransferPipeline(eng, max_inflight=0)
    pipe.shutdown()
    eng.close()


def test_accessor_construction_validates():
    a = make_pool()
    eng = KVTransferEngine("inprocess")
    with pytest.raises(KVInvalidTypeError):
        RemoteKVAccessor("engine", {0: a})
    with pytest.raises(KVConfigError):
        RemoteKVAccessor(eng, a)  # in-process needs {rank: pool}
    with pytest.raises(KVConfigError):
        RemoteKVAccessor(eng, {0: KVPool(num_blocks=8, block_size=BS)})  # metadata-only
    acc = RemoteKVAccessor(eng, {0: a})
    with pytest.raises(KVConfigError):
        acc.fetch([b"x"], 0)  # no directory and no src_rank
    with pytest.raises(KVConfigError):
        acc.serve()
