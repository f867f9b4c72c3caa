"""The seed package's public face: every seed name imports, every listed method works."""

from __future__ import annotations

import pytest
import torch

import sagellm_kv_cache as kv
from sagellm_kv_cache import errors as E
from sagellm_kv_cache.eviction import EvictionManager, FIFOEviction, LRUEviction, make_policy
from sagellm_kv_cache.eviction.registry import EvictionPolicyName
from sagellm_kv_cache.handle import KVHandle
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.storage import ModelShape

pytestmark = pytest.mark.timeout(60)

SEED_NAMES = [
    "PrefixCache",
    "PrefixIndex",
    "KVPool",
    "EvictionManager",
    "EvictionStrategy",
    "LRUEviction",
    "FIFOEviction",
    "LifetimePredictor",
    "HistoricalPredictor",
    "PredictorFeatures",
    "FeatureExtractor",
    "SchedulerBridge",
    "KVCacheManager",
    "KVHandle",
    "KVBlock",
    "KVTransferMetadata",
    "PrefixCacheEntry",
    "EvictionCandidate",
    "SchedulerRequest",
    "SchedulerPlan",
    "LifetimePrediction",
    "KVPoolStats",
    "KVTransferEngine",
    "SocketTransferBackend",
    "CommTransferBackendAdapter",
    "KVOffloadManager",
    "KVBlockState",
    "DType",
    "Layout",
    "MemoryTier",
    "EvictionPolicy",
    "KVCacheError",
    "KVBudgetExceededError",
    "KVMemoryExhaustedError",
    "KVPoolFullError",
    "KVInvalidHandleError",
    "KVDoubleFreeError",
    "KVHandlePinnedError",
    "KVHandleNotFoundError",
    "KVRefCountUnderflowError",
    "KVCacheMissError",
    "KVPrefixTooLongError",
    "KVNoVictimError",
    "KVEvictionFailedError",
    "KVAllPinnedError",
    "KVTransferFailedError",
    "KVTransferTimeoutError",
    "KVChecksumMismatchError",
    "KVMetadataMismatchError",
    "KVConfigMissingError",
    "KVConfigInvalidError",
    "KVNotImplementedError",
]


@pytest.mark.parametrize("name", SEED_NAMES)
def test_seed_name_is_exported(name):
    assert name in kv.__all__
    assert getattr(kv, name) is not None


# -- errors -------------------------------------------------------------------------------------
NEW_ERRORS = [
    ("KVMemoryExhaustedError", "KV_MEMORY_EXHAUSTED", E.KVBudgetExceededError, True),
    ("KVHandleNotFoundError", "KV_HANDLE_NOT_FOUND", E.KVInvalidHandleError, False),
    ("KVEvictionFailedError", "KV_EVICTION_FAILED", E.KVCacheError, False),
    ("KVAllPinnedError", "KV_ALL_PINNED", E.KVNoVictimError, True),
    ("KVMetadataMismatchError", "KV_METADATA_MISMATCH", E.KVTransferFailedError, False),
    ("KVConfigMissingError", "KV_CONFIG_MISSING", E.KVConfigError, False),
    ("KVConfigInvalidError", "KV_CONFIG_INVALID", E.KVConfigError, False),
    ("KVNotImplementedError", "KV_NOT_IMPLEMENTED", NotImplementedError, False),
]


@pytest.mark.parametrize(("name", "code", "parent", "retryable"), NEW_ERRORS)
def test_seed_errors_have_stable_codes(name, code, parent, retryable):
    cls = getattr(kv, name)
    err = cls("x")
    assert err.code == code and isinstance(err, parent) and err.is_retryable() is retryable


def test_old_codes_kept_and_retryable_table():
    assert E.ERROR_CODES["KV_CONFIG_INVALID"] is E.KVConfigError
    assert E.ERROR_CODES["KV_DOUBLE_FREE"] is E.KVDoubleFreeError
    assert E.KVTransferTimeoutError("t").is_retryable()
    assert E.KVChecksumMismatchError("c").is_retryable()
    assert not E.KVInvalidInputError("i").is_retryable()
    assert not E.KVDoubleFreeError("d").is_retryable()


# -- KVHandle -----------------------------------------------------------------------------------
def test_handle_methods_table():
    h = KVHandle.create(64, dtype=kv.DType.BF16, session_id="s1", node_rank=1)
    h.ref_count = 0
    assert (h.dtype, h.metadata["session_id"], h.node_rank) == ("bfloat16", "s1", 1)
    assert h.is_local(1) and not h.is_local(0)
    assert KVHandle.create(1).is_local() and KVHandle.create(1).node_rank is None
    assert h.estimate_size_bytes(head_dim=4, num_heads=2) == 2 * 64 * 2 * 4 * 2
    assert h.is_evictable()
    assert h.incr_ref() == 1 and not h.is_evictable()
    assert h.decr_ref() == 0 and h.is_evictable()
    with pytest.raises(E.KVRefCountUnderflowError) as ei:
        h.decr_ref()
    assert ei.value.code == "KV_REFCOUNT_UNDERFLOW" and h.ref_count == 0
    assert h.pin() == 1 and h.pin_count == 1 and not h.is_evictable()
    assert h.unpin() == 0
    with pytest.raises(E.KVRefCountUnderflowError):
        h.unpin()
    before = h.last_access_at
    h.touch()
    assert h.access_count == 1 and h.last_access_at > before
    with pytest.raises(E.KVInvalidInputError):
        h.estimate_size_bytes(head_dim=0)


def test_live_pool_handle_refuses_handle_level_pins():
    pool = KVPool(num_blocks=4, block_size=4)
    h = pool.alloc(8)
    with pytest.raises(E.KVInvalidInputError) as ei:
        h.pin()
    assert ei.value.code == "KV_INVALID_INPUT" and h.pin_count == 0 and h.ref_count == 1
    h.touch()  # touching is fine
    pool.free(h)
    pool.check_invariants()


def test_touch_drives_eviction_manager_lru_order():
    handles = [KVHandle.create(16) for _ in range(4)]
    for h in handles:
        h.ref_count = 0  # freed
    for i in (2, 0, 3, 1):
        handles[i].touch()
    mgr = EvictionManager("lru")
    victims = mgr.select_victims(handles, num_tokens_needed=64)
    assert [handles.index(v) for v in victims] == [2, 0, 3, 1]
    # one at a time, as the seed's loop would: victims come in the same order
    left = list(handles)
    order = []
    for _ in range(4):
        (v,) = mgr.select_victims(left, 16)
        order.append(handles.index(v))
        left.remove(v)
    assert order == [2, 0, 3, 1]
    # an in-use or pinned handle is never a victim
    handles[2].incr_ref()
    handles[0].pin()
    assert [handles.index(v) for v in mgr.select_victims(handles, 32)] == [3, 1]


def test_strategy_seed_methods():
    hs = [KVHandle.create(8) for _ in range(3)]
    for h in hs:
        h.ref_count = 0
    for i in (1, 2, 0):
        hs[i].touch()
    assert LRUEviction().get_policy_name() is EvictionPolicyName.LRU
    assert FIFOEviction().get_policy_name() is EvictionPolicyName.FIFO
    assert LRUEviction().select_victim(hs, 16) == [hs[1], hs[2]]
    assert FIFOEviction().select_victim(hs, 8) == [hs[0]]  # created first
    for h in hs:
        h.pin()
    with pytest.raises(E.KVAllPinnedError) as ei:
        LRUEviction().select_victim(hs, 8)
    assert ei.value.code == "KV_ALL_PINNED"


# -- models, prefix index -----------------------------------------------------------------------
def test_models_from_a_real_pool():
    pool = KVPool(num_blocks=4, block_size=4)
    h, _ = pool.alloc_with_prefix(list(range(8)))
    pool.cache_blocks(h)
    st = kv.KVPoolStats.from_pool(pool)
    assert (st.total_blocks, st.used_blocks, st.cached_blocks, st.num_handles) == (4, 2, 2, 1)
    assert st.utilization == 0.5
    assert kv.KVBlock.from_pool(pool, h.block_ids[0]).state is kv.KVBlockState.CACHED
    pool.free(h)
    assert kv.KVBlock.from_pool(pool, h.block_ids[0]).state is kv.KVBlockState.EVICTABLE
    free_id = ({0, 1, 2, 3} - set(h.block_ids)).pop()
    assert kv.KVBlock.from_pool(pool, free_id).state is kv.KVBlockState.FREE
    with pytest.raises(E.KVInvalidInputError):
        kv.KVBlock.from_pool(pool, 4)
    assert kv.Layout.CONTIGUOUS == "NHD" and kv.DType.FP16 == "float16"
    c = kv.EvictionCandidate.from_handle(h)
    assert c.handle_id == h.handle_id and c.num_tokens == 8


def test_prefix_index():
    idx = kv.PrefixIndex()
    idx.insert([1, 2], "a")
    idx.insert((1, 2, 3, 4), "b")
    assert idx.get([1, 2]) == "a" and idx.get([1]) is None
    assert idx.longest_prefix_match([1, 2, 3, 9]) == ("a", 2)
    assert idx.longest_prefix_match([1, 2, 3, 4, 5]) == ("b", 4)
    assert idx.longest_prefix_match([7]) == (None, 0)
    assert idx.remove([1, 2]) and not idx.remove([1, 2])
    assert idx.longest_prefix_match([1, 2, 3]) == (None, 0)
    idx.insert([5], "b")
    assert idx.remove_value("b") == 2 and len(idx) == 0
    with pytest.raises(E.KVInvalidTypeError):
        idx.insert("ab", 1)


# -- KVCacheManager -----------------------------------------------------------------------------
def test_cache_manager_prefix_methods():
    from sagellm_kv_cache.offload import KVOffloadManager
    from sagellm_kv_cache.scheduler import KVCacheManager

    m = KVCacheManager(KVOffloadManager.from_capacities({"gpu": 8}, block_size=4))
    h = m.alloc(12, metadata={"who": "sys"})
    assert h.num_tokens == 12 and len(h.block_ids) == 3
    m.register_prefix([1, 2, 3, 4, 5, 6], h)
    assert h.pin_count == 1
    assert m.query_prefix([1, 2, 3, 4, 5, 6, 7]) == (h, 6)
    assert m.query_prefix([9]) == (None, 0)
    assert m.get_reused_blocks([1, 2, 3, 4, 5, 6, 7]) == (h.block_ids[:2], 6)
    met = m.get_prefix_metrics()
    assert (met["prefix_queries"], met["prefix_hits"], met["reused_tokens"]) == (3, 2, 12)
    assert met["registered_prefixes"] == 1 and met["pinned_handles"] == 1
    with pytest.raises(E.KVHandlePinnedError):
        m.pool.free(h)  # registered: pinned, never evicted or freed under the index
    assert m.unregister_prefix(h) == 1 and h.pin_count == 0
    m.pool.free(h)
    m.check_invariants()


# -- KVTransferEngine ---------------------------------------------------------------------------
def test_transfer_engine_record_methods():
    shape = ModelShape(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16")
    src = KVPool(num_blocks=8, block_size=4, model_shape=shape)
    dst = KVPool(num_blocks=8, block_size=4, model_shape=shape)
    eng = kv.KVTransferEngine("inprocess")
    eng.register_pool(src, rank=0)
    eng.register_pool(dst, rank=1)
    h, _ = src.alloc_with_prefix(list(range(8)))
    src.write_kv(h, torch.ones(2, 2, 8, 2, 4, dtype=torch.float16))
    src.cache_blocks(h)
    assert eng.get_pending_count() == 0 and eng.get_completed_count() == 0
    tid = eng.transfer_kv_handle(h, src_rank=0, dst_rank=1)
    assert eng.get_completed_count() >= 1 and eng.get_pending_count() == 0
    assert eng.get_retry_count(tid) == 0
    m = eng.get_transfer_metrics(tid)
    assert m["status"] == "completed" and m["num_blocks"] == 2 and m["payload_nbytes"] > 0
    n = eng.get_completed_count()
    assert eng.clear_completed() == n and eng.get_completed_count() == 0
    with pytest.raises(E.KVInvalidInputError):
        eng.get_retry_count(tid)
    eng.close()


# -- SocketTransferBackend / CommTransferBackendAdapter -----------------------------------------
def test_socket_backend_seed_methods():
    """Seed: SocketTransferBackend(rank, world_size, endpoints, *, recv_timeout_s=5.0)."""
    b0 = kv.SocketTransferBackend(0, 2, recv_timeout_s=5.0).start()
    b1 = kv.SocketTransferBackend(1, 2, {0: b0.address, 1: ("127.0.0.1", 0)}).start()
    try:
        b0.update_endpoints({1: b1.address})
        assert (b0.get_rank(), b0.get_world_size(), b1.get_rank()) == (0, 2, 1)
        assert b0.address[0] == "127.0.0.1"  # loopback unless named
        b0.send(torch.arange(6, dtype=torch.int32), 1)
        out = torch.empty(6, dtype=torch.int32)
        b1.recv(out, 0)
        assert out.tolist() == [0, 1, 2, 3, 4, 5]
        b1.recv_timeout_s = 0.2
        with pytest.raises(E.KVTransferTimeoutError):
            b1.recv(bytearray(), 0)  # nothing sent
    finally:
        b0.close()
        b1.close()
    with pytest.raises(E.KVConfigError):
        b0.send(b"x", 1)  # closed


def test_comm_adapter_seed_methods():
    """Seed: CommTransferBackendAdapter(comm_backend, *, interconnect="rdma")."""
    sent = []

    class Comm:
        def send(self, tensor, dst_rank):
            sent.append((tensor.clone(), dst_rank))

        def recv(self, tensor, src_rank):
            tensor.copy_(sent.pop(0)[0])

        def get_rank(self):
            return 0

    a = kv.CommTransferBackendAdapter(Comm())
    assert (a.get_rank(), a.get_world_size(), a.interconnect) == (0, -1, "rdma")
    a.send(torch.tensor([5.0]), 1)
    assert sent[0][1] == 1
    out = torch.empty(1)
    a.recv(out, 1)
    assert out.item() == 5.0
    with pytest.raises(E.KVConfigError):
        kv.CommTransferBackendAdapter(None)
    a.close()


# -- KVOffloadManager ---------------------------------------------------------------------------
def test_offload_manager_seed_methods(tmp_path):
    shape = ModelShape(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16")
    m = kv.KVOffloadManager(KVPool(num_blocks=8, block_size=4, model_shape=shape), [])
    m.nvme_dir = tmp_path
    assert (m.offload_threshold, m.idle_offload_secs, m.nvme_offload_threshold) == (0.85, None, 0.9)
    h = m.device.alloc(8)
    data = torch.randn(2, 2, 8, 2, 4).half()
    m.device.write_kv(h, data)
    hid = h.handle_id
    m.register(h, device="npu:0")
    m.touch(hid)
    assert (m.registered_count(), m.offloaded_count(), m.current_device(hid)) == (1, 0, "npu:0")
    assert m.offload(hid).dst_device == "cpu" and m.is_offloaded(hid) and not m.is_on_nvme(hid)
    assert m.offload_to_nvme(hid).dst_device == "nvme" and m.is_on_nvme(hid)
    assert m.restore_from_nvme(hid).dst_device == "cpu" and not m.is_on_nvme(hid)
    new = m.restore(hid).handle
    assert m.current_device(hid) == "npu:0" and torch.equal(m.device.read_kv(new), data)
    assert m.get_handle_info(hid)["offload_count"] == 1
    assert m.maybe_offload(0.1) == [] and m.maybe_offload_idle() == []
    assert [s.handle_id for s in m.maybe_offload(0.99, npu_device="npu:0")] == [hid]
    assert [s.handle_id for s in m.maybe_cascade_to_nvme(0.99)] == [hid]
    m.unregister(hid)
    assert m.registered_count() == 0
    m.close()


# -- predictor ----------------------------------------------------------------------------------
def feat(hid, session, access_count, created=0.0, now=10.0):
    return kv.PredictorFeatures(
        handle_id=hid,
        request_id="r",
        session_id=session,
        num_tokens=16,
        last_access=now,
        access_count=access_count,
        created_at=created,
        extracted_at=now,
    )


def test_historical_predictor_moving_averages():
    p = kv.HistoricalPredictor(
        window_size=4, alpha=0.5, default_reuse_prob=0.5, default_lifetime=100.0
    )
    assert isinstance(p, kv.LifetimePredictor)
    (cold,) = p.predict_batch([feat("a", "s", 1)])
    assert (cold.reuse_probability, cold.predicted_lifetime, cold.confidence) == (0.5, 90.0, 0.0)
    p.update(feat("a", "s", 2), 40.0)  # reused, lived 40: first sample replaces the prior
    p.update(feat("b", "s", 1), 20.0)  # not reused: EMA 0.5 * (0 - 1)
    (a, other) = p.predict_batch([feat("c", "s", 1, now=5.0), feat("d", "t", 1, now=5.0)])
    assert (a.reuse_probability, a.predicted_lifetime, a.confidence) == (0.5, 25.0, 0.5)
    assert other.reuse_probability == 0.5 and other.predicted_lifetime == 25.0  # global fallback
    assert p.get_statistics()["s"] == {
        "avg_reuse_prob": 0.5,
        "avg_lifetime": 30.0,
        "sample_count": 2,
    }
    with pytest.raises(E.KVInvalidInputError):
        p.predict_batch([])
    with pytest.raises(E.KVInvalidInputError):
        p.update(feat("a", "s", 1), -1.0)
    assert p.get_model_version()


def test_feature_extractor_from_handles():
    hs = [KVHandle.create(8, session_id="s"), KVHandle.create(4)]
    fs = kv.FeatureExtractor().extract_batch(hs, hit_lens=[4, 0])
    assert [f.session_id for f in fs] == ["s", None] and fs[0].hit_len == 4 and fs[0].reused
    with pytest.raises(E.KVInvalidInputError):
        kv.FeatureExtractor().extract_batch(hs, hit_lens=[1])


def test_new_policies_are_registered():
    assert type(make_policy("predictive")).__name__ == "PredictivePolicy"
    assert type(make_policy("workload-aware")).__name__ == "WorkloadAwarePolicy"
    assert type(make_policy(EvictionPolicyName.WORKLOAD_AWARE)).__name__ == "WorkloadAwarePolicy"


def test_one_lazy_loader_serves_the_packages():
    import importlib
    import subprocess
    import sys

    code = (
        "import sys, sagellm_kv_cache as s, sim\n"
        "import sagellm_kv_cache.observability as o\n"
        "assert 'torch' not in sys.modules and 'polars' not in sys.modules\n"
        "for pkg in (s, o, sim):\n"
        "    assert pkg.__getattr__.__module__ == 'sagellm_kv_cache.lazy'\n"
        "assert 'KVPool' not in vars(s) and 'KVPool' in dir(s)\n"
        "assert s.KVPool is vars(s)['KVPool']\n"  # cached after the first use
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    sk = importlib.import_module("sagellm_kv_cache")
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        sk.Nope  # noqa: B018
