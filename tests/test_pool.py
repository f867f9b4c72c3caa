"""KVPool: the seed API, the engine-facing path, typed errors that change nothing."""

from __future__ import annotations

import threading

import pytest
from conftest import make_pool, make_tokens

from sagellm_kv_cache import errors as E
from sagellm_kv_cache.handle import HandleState, KVHandle
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.storage import ModelShape


def snapshot(pool: KVPool):
    bp = pool.block_pool
    return (
        pool.get_stats(),
        list(bp.free_queue),
        list(bp.ref_counts),
        list(bp.pin_counts),
        dict(bp.cached),
        bp.policy.peek_victims(10**6),
        sorted(h.handle_id for h in pool.handles),
    )


def test_sizing_by_tokens_blocks_and_bytes():
    assert KVPool(max_tokens=1024).num_blocks == 64
    assert KVPool(max_tokens=1000, block_size=16).max_tokens == 992
    assert KVPool(num_blocks=10, block_size=32).max_tokens == 320
    shape = ModelShape(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bf16")
    assert shape.bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    pool = KVPool(max_bytes=1 << 30, model_shape=shape, metadata_only=True)
    assert pool.num_blocks == (1 << 30) // (131072 * 16) == 512
    assert KVPool(max_bytes=1 << 30, model_shape="llama-3-8b", metadata_only=True).num_blocks == 512


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({}, E.KVConfigError),
        ({"max_tokens": 1024, "num_blocks": 4}, E.KVConfigError),
        ({"max_tokens": 8}, E.KVConfigError),  # less than one block
        ({"max_tokens": 0}, E.KVInvalidInputError),
        ({"max_tokens": 64.0}, E.KVInvalidTypeError),
        ({"max_bytes": 1 << 20}, E.KVConfigError),  # needs a model shape
        ({"max_tokens": 64, "device": "tpu"}, E.KVConfigError),
        ({"max_tokens": 64, "dtype": "int4"}, E.KVConfigError),
        ({"max_tokens": 64, "layout": "XYZ"}, E.KVConfigError),
        ({"max_tokens": 64, "eviction_policy": "nope"}, E.KVConfigError),
        ({"max_tokens": 64, "block_size": 0}, E.KVConfigError),
        ({"max_tokens": 64, "metadata_only": False}, E.KVConfigError),
    ],
)
def test_bad_construction(kwargs, error):
    with pytest.raises(error):
        KVPool(**kwargs)


def test_alloc_free_accounting(pool):
    h = pool.alloc(10)
    assert isinstance(h, KVHandle)
    assert h.block_ids == [0, 1, 2] and h.num_tokens == 10 and h.device == "cpu"
    assert pool.get_allocated_tokens() == 12
    assert pool.get_available_tokens() == 20
    assert pool.can_admit(20) and not pool.can_admit(21)
    pool.free(h)
    assert h.state is HandleState.FREED
    assert pool.get_allocated_tokens() == 0 and pool.get_available_tokens() == 32
    s = pool.get_stats()
    assert (s["num_allocs"], s["num_frees"], s["num_handles"]) == (1, 1, 0)


BAD_CALLS = [
    ("alloc zero", lambda p, h, o: p.alloc(0), E.KVInvalidInputError),
    ("alloc negative", lambda p, h, o: p.alloc(-3), E.KVInvalidInputError),
    ("alloc float", lambda p, h, o: p.alloc(3.0), E.KVInvalidTypeError),
    ("alloc bool", lambda p, h, o: p.alloc(True), E.KVInvalidTypeError),
    ("alloc str", lambda p, h, o: p.alloc("4"), E.KVInvalidTypeError),
    ("alloc unknown device", lambda p, h, o: p.alloc(4, device="npu"), E.KVConfigError),
    ("alloc over budget", lambda p, h, o: p.alloc(33), E.KVBudgetExceededError),
    ("alloc more than free", lambda p, h, o: p.alloc(25), E.KVBudgetExceededError),
    ("free twice", lambda p, h, o: p.free(h["freed"]), E.KVDoubleFreeError),
    ("free other pool's handle", lambda p, h, o: p.free(o), E.KVInvalidHandleError),
    ("free not a handle", lambda p, h, o: p.free("abc"), E.KVInvalidTypeError),
    ("free pinned", lambda p, h, o: p.free(h["pinned"]), E.KVHandlePinnedError),
    ("unpin unpinned", lambda p, h, o: p.unpin(h["live"]), E.KVRefCountUnderflowError),
    ("pin freed", lambda p, h, o: p.pin(h["freed"]), E.KVDoubleFreeError),
    (
        "prefix non-int tokens",
        lambda p, h, o: p.alloc_with_prefix([1, 2, "x", 4]),
        E.KVInvalidTypeError,
    ),
    ("prefix empty tokens", lambda p, h, o: p.alloc_with_prefix([]), E.KVInvalidInputError),
    (
        "prefix over budget",
        lambda p, h, o: p.alloc_with_prefix(list(range(40))),
        E.KVBudgetExceededError,
    ),
    (
        "hashes/num_tokens mismatch",
        lambda p, h, o: p.alloc_with_prefix(block_hashes=[1, 2, 3], num_tokens=4),
        E.KVInvalidInputError,
    ),
    (
        "hashes without num_tokens",
        lambda p, h, o: p.alloc_with_prefix(block_hashes=[1]),
        E.KVInvalidInputError,
    ),
    (
        "cache too many hashes",
        lambda p, h, o: p.cache_blocks(h["live"], block_hashes=[1, 2, 3, 4]),
        E.KVInvalidInputError,
    ),
    ("evict zero", lambda p, h, o: p.evict(0), E.KVInvalidInputError),
    ("read kv metadata-only", lambda p, h, o: p.read_kv(h["live"]), E.KVConfigError),
]


@pytest.mark.parametrize("name,call,error", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_typed_error_and_changes_nothing(name, call, error):
    pool = make_pool(num_blocks=8, block_size=4)
    other = make_pool().alloc(4)
    handles = {"live": pool.alloc(4), "pinned": pool.alloc(4), "freed": pool.alloc(4)}
    pool.pin(handles["pinned"])
    pool.free(handles["freed"])
    cached, _ = pool.alloc_with_prefix(list(range(8)))
    pool.cache_blocks(cached)
    pool.free(cached)
    before = snapshot(pool)
    with pytest.raises(error) as exc:
        call(pool, handles, other)
    assert isinstance(exc.value, E.KVCacheError) and exc.value.code
    assert snapshot(pool) == before
    pool.check_invariants()


def test_engine_path_reuses_cached_prefix_and_counts_hits():
    pool = make_pool(num_blocks=16, block_size=4)
    prompt = make_tokens(14, seed=1)  # 3 full blocks + 2 tokens
    h1, hit1 = pool.alloc_with_prefix(prompt)
    assert hit1 == 0 and h1.block_ids == [0, 1, 2, 3]
    assert pool.cache_blocks(h1) == 3
    pool.free(h1)
    follow = prompt[:12] + make_tokens(9, seed=2)  # shares 3 full blocks
    h2, hit2 = pool.alloc_with_prefix(follow, request_id="r2")
    assert hit2 == 12 and h2.num_cached_tokens == 12
    assert h2.block_ids[:3] == [0, 1, 2]
    assert h2.block_ids[3:] == [4, 5, 6]
    assert pool.cache_blocks(h2) == 2  # blocks 3, 4 of the new prompt (21 tokens: 5 full)
    s = pool.get_stats()
    assert (s["prefix_query_tokens"], s["prefix_hit_tokens"]) == (14 + 21, 12)
    assert (s["prefix_query_blocks"], s["prefix_hit_blocks"]) == (3 + 5, 3)
    assert s["request_hit_ratio"] == 0.5
    assert s["token_hit_ratio"] == pytest.approx(12 / 35)
    pool.free(h2)
    pool.check_invariants()


def test_hit_blocks_in_use_are_never_evicted():
    pool = make_pool(num_blocks=4, block_size=4)
    a, _ = pool.alloc_with_prefix(list(range(8)))
    pool.cache_blocks(a)
    b, hit = pool.alloc_with_prefix(list(range(8)))  # shares both blocks, a still alive
    assert hit == 8 and b.block_ids == a.block_ids
    pool.free(a)
    # only the 2 free blocks are obtainable: the shared ones are still held by b
    with pytest.raises(E.KVBudgetExceededError):
        pool.alloc(9)
    c = pool.alloc(8)
    assert c.block_ids == [2, 3]
    assert pool.match_prefix(list(range(8)))[1] == 8


def test_full_hit_with_evictable_hits_counts_supply_correctly():
    pool = make_pool(num_blocks=3, block_size=4)
    a, _ = pool.alloc_with_prefix(list(range(12)))
    pool.cache_blocks(a)
    pool.free(a)
    # all 3 blocks are evictable; the same prompt needs 0 new blocks and must succeed
    b, hit = pool.alloc_with_prefix(list(range(12)))
    assert hit == 12 and b.block_ids == [0, 1, 2]
    pool.free(b)
    # a 2-block prompt sharing one block: 1 hit (evictable) + 1 new must evict
    c, hit = pool.alloc_with_prefix(list(range(4)) + [99] * 4)
    assert hit == 4 and c.block_ids == [0, 2]
    pool.check_invariants()


def test_pin_keeps_handle_and_blocks():
    pool = make_pool(num_blocks=4, block_size=4)
    h, _ = pool.alloc_with_prefix(list(range(8)))
    pool.cache_blocks(h)
    pool.pin(h)
    with pytest.raises(E.KVHandlePinnedError):
        pool.free(h)
    pool.unpin(h)
    pool.free(h)
    assert pool.get_stats()["evictable_blocks"] == 2


def test_handle_round_trips_through_dict():
    pool = make_pool()
    h, _ = pool.alloc_with_prefix(list(range(9)), metadata={"model": "m"})
    d = h.to_dict()
    back = KVHandle.from_dict(d)
    assert back.to_dict() == d
    assert back.block_hashes == h.block_hashes and back.state is HandleState.ALLOCATED


def test_reset_invalidates_handles():
    pool = make_pool()
    h = pool.alloc(4)
    pool.reset()
    assert pool.get_stats()["free_blocks"] == 8
    with pytest.raises(E.KVDoubleFreeError):
        pool.free(h)


def test_handles_from_another_pool_are_refused_even_if_ids_match():
    a, b = make_pool(), make_pool()
    ha = a.alloc(4)
    b.alloc(4)
    with pytest.raises(E.KVInvalidHandleError):
        b.free(ha)


def test_error_codes_are_unique_and_builtins_match():
    codes = [cls.code for cls in E.ERROR_CODES.values()]
    assert len(codes) == len(set(codes))
    assert issubclass(E.KVInvalidInputError, ValueError)
    assert issubclass(E.KVInvalidTypeError, TypeError)
    assert issubclass(E.KVTransferTimeoutError, TimeoutError)
    assert issubclass(E.KVCacheMissError, KeyError)
    assert E.ERROR_CODES["KV_DOUBLE_FREE"] is E.KVDoubleFreeError
    assert "KV_POOL_FULL" in str(E.KVPoolFullError("x"))


def test_budget_holds_under_threads():
    pool = make_pool(num_blocks=64, block_size=4)
    got: list = []
    failures = []

    def worker(seed: int) -> None:
        for i in range(200):
            try:
                h, _ = pool.alloc_with_prefix(make_tokens(16, seed=seed * 1000 + i % 7))
                pool.cache_blocks(h)
                got.append(h)
                assert pool.get_stats()["used_blocks"] <= 64
                pool.free(h)
            except E.KVBudgetExceededError:
                failures.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert len(got) + len(failures) == 800
    pool.check_invariants()
    assert pool.get_stats()["used_blocks"] == 0
