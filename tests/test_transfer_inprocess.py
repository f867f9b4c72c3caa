"""KVTransferEngine with the in-process backend: pool -> pool in one process."""

from __future__ import annotations

import pytest
import torch

from sagellm_kv_cache import KVTransferEngine
from sagellm_kv_cache.errors import (
    KVChecksumMismatchError,
    KVConfigError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVTransferFailedError,
)
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.storage import ModelShape
from sagellm_kv_cache.testing.faults import inject_faults
from sagellm_kv_cache.transfer import TransferStatus

pytestmark = pytest.mark.timeout(60)

SHAPE = ModelShape(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16")
BS = 4


def make_tensor_pool(num_blocks: int = 16, **kw) -> KVPool:
    return KVPool(num_blocks=num_blocks, block_size=BS, model_shape=SHAPE, **kw)


def filled_handle(pool: KVPool, tokens: list[int], seed: int = 0):
    """A cached handle whose KV is random (fixed seed); returns (handle, kv)."""
    h, _ = pool.alloc_with_prefix(tokens)
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(SHAPE.num_layers, 2, len(tokens), 2, 4, generator=g).half()
    pool.write_kv(h, kv)
    pool.cache_blocks(h)
    return h, kv


def make_engine(**kw) -> tuple[KVTransferEngine, KVPool, KVPool]:
    src, dst = make_tensor_pool(), make_tensor_pool()
    eng = KVTransferEngine("inprocess", **kw)
    eng.register_pool(src, rank=0)
    eng.register_pool(dst, rank=1)
    return eng, src, dst


def accounting(pool: KVPool) -> tuple:
    pool.check_invariants()
    s = pool.get_stats()
    return s["free_blocks"], s["used_blocks"], s["cached_blocks"], s["num_handles"]


def test_blocks_arrive_bit_exact_and_hit_the_receivers_prefix_cache():
    eng, src, dst = make_engine(chunk_bytes=512)  # 2 blocks per chunk: several chunks
    tokens = list(range(100, 126))  # 6 full blocks + 2 tokens
    h, kv = filled_handle(src, tokens)
    tid = eng.transfer_kv_handle(h, src_rank=0, dst_rank=1)

    assert eng.get_transfer_status(tid) is TransferStatus.COMPLETED
    meta = eng.get_transfer_metadata(tid)
    assert meta["num_blocks"] == 7 and meta["num_tokens"] == 26
    assert meta["payload_nbytes"] == 7 * SHAPE.bytes_per_block(BS)
    assert meta["retries"] == 0 and meta["checksum_algo"] == "xxh3_64"
    # receiver side: blocks cached and evictable, a request with the prefix hits them
    assert accounting(dst) == (16 - 6, 0, 6, 0)
    h2, hit_tokens = dst.alloc_with_prefix(tokens)
    assert hit_tokens == 24
    assert torch.equal(
        dst.read_kv(h2, num_tokens=24).view(torch.int16), kv[:, :, :24].view(torch.int16)
    )
    dst.free(h2)
    # the sender's handle is untouched
    assert torch.equal(src.read_kv(h), kv)


def test_batched_transfer_moves_many_handles_in_one_operation():
    eng, src, dst = make_engine(chunk_bytes=3 * SHAPE.bytes_per_block(BS))
    handles, kvs, prompts = [], [], []
    for i in range(5):
        tokens = [1000 * (i + 1) + t for t in range(8)]
        h, kv = filled_handle(src, tokens, seed=i)
        handles.append(h)
        kvs.append(kv)
        prompts.append(tokens)
    tid = eng.transfer_kv_handles(handles, 0, 1)
    meta = eng.get_transfer_metadata(tid)
    assert meta["num_segments"] == 5 and meta["num_blocks"] == 10
    for tokens, kv in zip(prompts, kvs):
        h2, hit = dst.alloc_with_prefix(tokens)
        assert hit == 8
        assert torch.equal(dst.read_kv(h2), kv)
        dst.free(h2)


def test_receiver_budget_failure_leaves_both_pools_unchanged():
    src = make_tensor_pool(16)
    dst = make_tensor_pool(4)
    eng = KVTransferEngine("inprocess", max_retries=1, retry_backoff_ms=1)
    eng.register_pool(src, 0)
    eng.register_pool(dst, 1)
    h, _ = filled_handle(src, list(range(24)))  # 6 blocks > 4
    before_src, before_dst = accounting(src), accounting(dst)
    with pytest.raises(KVTransferFailedError, match="no room") as info:
        eng.transfer_kv_handle(h, 0, 1)
    assert info.value.details["remote_code"] == "KV_BUDGET_EXCEEDED"
    assert accounting(src) == before_src and accounting(dst) == before_dst
    assert eng.get_metrics()["failed"] == 1


def test_corrupted_copy_is_detected_retried_and_never_visible():
    eng, src, dst = make_engine(max_retries=1, retry_backoff_ms=1, chunk_bytes=512)
    tokens = list(range(16))
    h, kv = filled_handle(src, tokens)
    calls = []

    def corrupt_first(stage, chunk=None, index=None, **_):
        calls.append(index)
        if len(calls) == 1:  # first chunk of the first attempt only
            chunk[5] ^= 0xFF

    inject_faults(eng, corrupt_first)
    tid = eng.transfer_kv_handle(h, 0, 1)
    assert eng.get_transfer_metadata(tid)["retries"] == 1
    h2, hit = dst.alloc_with_prefix(tokens)
    assert hit == 16 and torch.equal(dst.read_kv(h2), kv)
    dst.free(h2)

    # corrupt every attempt: a typed error and nothing on the receiver
    dst.reset()
    inject_faults(eng, lambda stage, chunk=None, **_: chunk.__setitem__(0, chunk[0] ^ 1))
    with pytest.raises(KVChecksumMismatchError):
        eng.transfer_kv_handle(h, 0, 1)
    assert accounting(dst) == (16, 0, 0, 0)
    assert dst.match_prefix(tokens) == ([], 0)


def test_without_checksum_corruption_goes_unnoticed():
    # the checksum is what catches corruption: without it the bytes land as sent
    eng, src, dst = make_engine(enable_checksum=False)
    h, kv = filled_handle(src, list(range(8)))
    inject_faults(eng, lambda stage, chunk=None, **_: chunk.__setitem__(0, chunk[0] ^ 1))
    eng.transfer_kv_handle(h, 0, 1)
    h2, hit = dst.alloc_with_prefix(list(range(8)))
    assert hit == 8 and not torch.equal(dst.read_kv(h2), kv)


def test_zlib_compression_round_trips():
    eng, src, dst = make_engine(compression="zlib", chunk_bytes=512)
    tokens = list(range(40))
    h, _ = src.alloc_with_prefix(tokens)
    kv = torch.zeros(2, 2, 40, 2, 4, dtype=torch.float16)
    kv[:, :, ::3] = 1.5  # compressible
    src.write_kv(h, kv)
    src.cache_blocks(h)
    tid = eng.transfer_kv_handle(h, 0, 1)
    meta = eng.get_transfer_metadata(tid)
    assert meta["compression"] == "zlib"
    assert meta["wire_nbytes"] < meta["payload_nbytes"]
    h2, hit = dst.alloc_with_prefix(tokens)
    assert hit == 40 and torch.equal(dst.read_kv(h2), kv)


def test_async_transfers_complete_and_report_metrics():
    eng, src, dst = make_engine()
    futures, kvs = [], []
    for i in range(4):
        h, kv = filled_handle(src, [i * 100 + t for t in range(12)], seed=i)
        kvs.append(kv)
        futures.append(eng.transfer_kv_handle_async(h, 0, 1))
    tids = [f.result(timeout=30) for f in futures]
    assert len(set(tids)) == 4
    assert all(eng.get_transfer_status(t) is TransferStatus.COMPLETED for t in tids)
    m = eng.get_metrics()
    assert m["completed"] == 4 and m["failed"] == 0
    assert m["bytes"] == 4 * 3 * SHAPE.bytes_per_block(BS) and m["gbps"] > 0
    assert accounting(dst)[2] == 12
    eng.close()


def test_explicit_tensor_instead_of_a_registered_source_pool():
    dst = make_tensor_pool()
    eng = KVTransferEngine("inprocess")
    eng.register_pool(dst, 1)
    src = make_tensor_pool()
    h, kv = filled_handle(src, list(range(8)))
    blocks = src.storage.read_blocks(h.block_ids)
    eng.transfer_kv_handle(h, 0, 1, tensor=blocks)
    h2, hit = dst.alloc_with_prefix(list(range(8)))
    assert hit == 8 and torch.equal(dst.read_kv(h2), kv)
    with pytest.raises(KVInvalidInputError, match="expected"):
        eng.transfer_kv_handle(h, 0, 1, tensor=blocks[:, :, :1])


def test_bad_inputs_raise_typed_errors_and_change_nothing():
    eng, src, dst = make_engine()
    h, _ = filled_handle(src, list(range(8)))
    other = make_tensor_pool()
    foreign, _ = filled_handle(other, list(range(8)))
    with pytest.raises(KVInvalidHandleError):
        eng.transfer_kv_handle(foreign, 0, 1)
    with pytest.raises(KVConfigError, match="rank 5"):
        eng.transfer_kv_handle(h, 0, 5)
    src.free(h)
    with pytest.raises(KVInvalidHandleError, match="freed"):
        eng.transfer_kv_handle(h, 0, 1)
    wrong = KVPool(num_blocks=16, block_size=8, model_shape=SHAPE)
    eng.register_pool(wrong, 2)
    h3, _ = filled_handle(src, list(range(100, 108)))  # not a prefix hit: fresh blocks
    with pytest.raises(KVConfigError, match="geometry"):
        eng.transfer_kv_handle(h3, 0, 2)
    assert accounting(dst) == (16, 0, 0, 0) and accounting(wrong) == (16, 0, 0, 0)
    with pytest.raises(KVConfigError):
        KVTransferEngine("inprocess", timeout_s=0)
    with pytest.raises(KVConfigError):
        KVTransferEngine("carrier-pigeon")
    with pytest.raises(KVConfigError, match="metadata-only"):
        eng.register_pool(KVPool(num_blocks=4), 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_to_host_move():  # pragma: no cover - no GPU in CI
    gpu = KVPool(num_blocks=16, block_size=BS, model_shape=SHAPE, device="cuda")
    cpu = make_tensor_pool()
    eng = KVTransferEngine("inprocess")
    eng.register_pool(gpu, 0)
    eng.register_pool(cpu, 1)
    h, kv = filled_handle(gpu, list(range(16)))
    eng.transfer_kv_handle(h, 0, 1)
    h2, hit = cpu.alloc_with_prefix(list(range(16)))
    assert hit == 16 and torch.equal(cpu.read_kv(h2), kv.cpu())


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_compressed_transfer_round_trips_bit_exact(codec):
    if codec == "zstd":
        pytest.importorskip("zstandard")
    eng, src, dst = make_engine(compression=codec, chunk_bytes=512)
    tokens = list(range(40))
    h, _ = src.alloc_with_prefix(tokens)
    kv = torch.zeros(2, 2, 40, 2, 4, dtype=torch.float16)
    kv[:, :, ::3] = 1.5  # compressible
    src.write_kv(h, kv)
    src.cache_blocks(h)
    meta = eng.get_transfer_metadata(eng.transfer_kv_handle(h, 0, 1))
    assert (meta["compression"], meta["num_blocks"]) == (codec, 10)
    assert meta["wire_nbytes"] < meta["payload_nbytes"]
    h2, hit = dst.alloc_with_prefix(tokens)
    assert hit == 40 and torch.equal(dst.read_kv(h2), kv)


def test_missing_zstandard_is_a_config_error_naming_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails as if not installed
    with pytest.raises(KVConfigError) as ei:
        KVTransferEngine("inprocess", compression="zstd")
    assert ei.value.code == "KV_CONFIG_INVALID"
    assert "sagellm-kv-cache[zstd]" in ei.value.message
    with pytest.raises(KVConfigError):
        KVTransferEngine("inprocess", compression="lz4")


def test_two_transfers_at_once_both_land_bit_exact():
    import threading

    src = make_tensor_pool(64)
    dst = make_tensor_pool(64)
    eng = KVTransferEngine("inprocess", direct_min_message_bytes=0)
    eng.register_pool(src, rank=0)
    eng.register_pool(dst, rank=1)
    (h1, kv1), (h2, kv2) = (
        filled_handle(src, [i * 1000 + t for t in range(40)], i) for i in (1, 2)
    )
    errors: list[BaseException] = []

    def send(h):
        try:
            eng.transfer_kv_handle(h, 0, 1)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(h,)) for h in (h1, h2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and not any(t.is_alive() for t in threads)
    for i, kv in ((1, kv1), (2, kv2)):
        h, hit = dst.alloc_with_prefix([i * 1000 + t for t in range(40)])
        assert hit == 40 and torch.equal(dst.read_kv(h), kv)
        dst.free(h)
    assert accounting(dst) == (44, 0, 20, 0)
    assert eng.transfer_ids() == [1, 2] and eng.registered_pool(1) is dst


def test_injected_faults_stop_when_the_hook_is_removed():
    eng, src, dst = make_engine(max_retries=0)
    tokens = list(range(16))
    h, kv = filled_handle(src, tokens)
    wrapped = inject_faults(eng, lambda stage, chunk=None, **_: chunk.__setitem__(0, chunk[0] ^ 1))
    assert eng.backend is wrapped and wrapped.inner.name == "inprocess"
    with pytest.raises(KVChecksumMismatchError):
        eng.transfer_kv_handle(h, 0, 1)
    assert inject_faults(eng, None) is wrapped  # wrapped once; the hook is cleared
    eng.transfer_kv_handle(h, 0, 1)
    h2, hit = dst.alloc_with_prefix(tokens)
    assert hit == 16 and torch.equal(dst.read_kv(h2), kv)


def test_a_kept_source_digest_that_went_stale_is_rechecked_not_trusted():
    # direct pieces: the source digest of cached blocks is kept after the first move
    eng, src, dst = make_engine(direct_min_message_bytes=0, max_retries=0)
    tokens = list(range(32))
    h, kv = filled_handle(src, tokens, seed=3)
    eng.transfer_kv_handle(h, 0, 1)
    # the source bytes change under the same block hashes (what immutability forbids):
    # the kept digest no longer matches, the bytes are hashed again, the move lands
    src.storage.kv.add_(1)
    dst.reset()
    tid = eng.transfer_kv_handle(h, 0, 1)
    assert eng.get_transfer_metadata(tid)["retries"] == 0
    h2, hit = dst.alloc_with_prefix(tokens)
    assert hit == 32 and torch.equal(dst.read_kv(h2), src.read_kv(h))
    assert not torch.equal(dst.read_kv(h2), kv)
