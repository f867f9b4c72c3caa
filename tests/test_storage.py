"""KV tensors: bit-exact write/read, layouts, dtypes, reuse after free, CUDA when present."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_pool, make_tokens

from sagellm_kv_cache import errors as E
from sagellm_kv_cache.storage import KVStorage, ModelShape

DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


def random_kv(shape: ModelShape, num_tokens: int, seed: int, dtype=torch.float16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(
        shape.num_layers, 2, num_tokens, shape.num_kv_heads, shape.head_dim, generator=g
    )
    return kv.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_write_read_bit_exact(device, layout, dtype):
    shape = ModelShape(2, 2, 4, dtype)
    pool = make_pool(num_blocks=8, block_size=4, model_shape=shape, layout=layout, device=device)
    tdtype = getattr(torch, dtype)
    h = pool.alloc(11)
    kv = random_kv(shape, 11, seed=1, dtype=tdtype)
    pool.write_kv(h, kv)
    out = pool.read_kv(h)
    assert out.device.type == torch.device(device).type
    assert out.dtype == tdtype and out.shape == (2, 2, 11, 2, 4)
    assert torch.equal(out.cpu(), kv)
    # partial write in the middle, across a block boundary
    patch = random_kv(shape, 5, seed=2, dtype=tdtype)
    pool.write_kv(h, patch, start_token=3)
    expect = kv.clone()
    expect[:, :, 3:8] = patch
    assert torch.equal(pool.read_kv(h).cpu(), expect)
    assert torch.equal(pool.read_kv(h, num_tokens=4, start_token=6).cpu(), expect[:, :, 6:10])


def test_fp8_is_stored_as_uint8_and_read_back_as_float8():
    shape = ModelShape(2, 2, 4, "fp8_e4m3")
    pool = make_pool(num_blocks=4, block_size=4, model_shape=shape)
    assert pool.storage.kv.dtype == torch.uint8
    h = pool.alloc(8)
    kv = random_kv(shape, 8, seed=3, dtype=torch.float32).to(torch.float8_e4m3fn)
    pool.write_kv(h, kv)
    out = pool.read_kv(h)
    assert out.dtype == torch.float8_e4m3fn
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


def test_layer_view_is_zero_copy_and_paged():
    pool = make_pool(num_blocks=4, block_size=4, model_shape=TINY)
    h = pool.alloc(4)
    kv = random_kv(TINY, 4, seed=4)
    pool.write_kv(h, kv)
    layer1 = pool.storage.layer(1)
    assert layer1.shape == (2, 4, 4, 2, 4)
    assert layer1.data_ptr() == pool.storage.kv[1].data_ptr()
    b = h.block_ids[0]
    assert torch.equal(layer1[0, b], kv[1, 0])  # K of layer 1, tokens 0..3
    assert torch.equal(layer1[1, b], kv[1, 1])  # V


def test_cached_hit_returns_original_kv_after_free_and_block_reuse():
    pool = make_pool(num_blocks=6, block_size=4, model_shape=TINY)
    prompt = make_tokens(8, seed=5)
    h1, _ = pool.alloc_with_prefix(prompt)
    kv1 = random_kv(TINY, 8, seed=6)
    pool.write_kv(h1, kv1)
    pool.cache_blocks(h1)
    pool.free(h1)
    # other traffic reuses every free block, but not the cached ones
    for i in range(3):
        h = pool.alloc(16)
        pool.write_kv(h, random_kv(TINY, 16, seed=10 + i))
        pool.free(h)
    h2, hit = pool.alloc_with_prefix(prompt + [1, 2, 3])
    assert hit == 8
    assert torch.equal(pool.read_kv(h2, num_tokens=8), kv1)


def test_copy_blocks_and_block_io():
    pool = make_pool(num_blocks=4, block_size=4, model_shape=TINY)
    h = pool.alloc(8)
    kv = random_kv(TINY, 8, seed=7)
    pool.write_kv(h, kv)
    pool.copy_blocks(h.block_ids, [2, 3])
    assert torch.equal(pool.storage.read_blocks([2, 3]), pool.storage.read_blocks(h.block_ids))
    with pytest.raises(E.KVInvalidInputError):
        pool.copy_blocks([0], [4])
    with pytest.raises(E.KVInvalidInputError):
        pool.storage.copy_blocks([0, 1], [2])


def test_bad_kv_writes_are_refused_and_change_nothing():
    pool = make_pool(num_blocks=4, block_size=4, model_shape=TINY)
    h = pool.alloc(8)
    kv = random_kv(TINY, 8, seed=8)
    pool.write_kv(h, kv)
    before = pool.storage.kv.clone()
    with pytest.raises(E.KVInvalidInputError):
        pool.write_kv(h, random_kv(TINY, 9, seed=9))  # overflows the handle
    with pytest.raises(E.KVInvalidInputError):
        pool.write_kv(h, torch.zeros(2, 2, 4, 3, 4, dtype=torch.float16))  # wrong heads
    with pytest.raises(E.KVInvalidTypeError):
        pool.write_kv(h, random_kv(TINY, 4, seed=9, dtype=torch.float32))  # wrong dtype
    with pytest.raises(E.KVInvalidTypeError):
        pool.write_kv(h, [[1, 2]])
    with pytest.raises(E.KVInvalidInputError):
        pool.read_kv(h, num_tokens=9)
    assert torch.equal(pool.storage.kv, before)


def test_storage_bytes_match_model_shape():
    st = KVStorage(10, 16, ModelShape(4, 2, 8, "bfloat16"))
    assert (
        st.nbytes
        == 10 * ModelShape(4, 2, 8, "bfloat16").bytes_per_block(16)
        == 10 * 16 * 2 * 4 * 2 * 8 * 2
    )


def test_cuda_request_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(E.KVConfigError):
        make_pool(model_shape=TINY, device="cuda:0")


# -- block copies between storages (offload onboarding) ------------------------------------------
def _filled_storage(num_blocks: int, seed: int, layout: str = "NHD") -> KVStorage:
    st = KVStorage(num_blocks, 4, TINY, "cpu", layout)
    g = torch.Generator().manual_seed(seed)
    st.kv.copy_(torch.randn(st.kv.shape, generator=g).to(st.kv.dtype))
    return st


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_copy_blocks_from_moves_runs_and_single_blocks_bit_exact(layout):
    src, dst = _filled_storage(8, 1, layout), _filled_storage(8, 2, layout)
    before = dst.kv.clone()
    src_ids, dst_ids = [2, 3, 4, 7, 0], [5, 6, 7, 0, 3]  # a run of three, then two singles
    dst.copy_blocks_from(src, src_ids, dst_ids)
    assert torch.equal(dst.read_blocks(dst_ids), src.read_blocks(src_ids))
    untouched = [1, 2, 4]
    assert torch.equal(dst.read_blocks(untouched), before[:, :, untouched])


def test_copy_blocks_from_checks_everything_before_copying():
    src, dst = _filled_storage(4, 1), _filled_storage(4, 2)
    before = dst.kv.clone()
    with pytest.raises(E.KVInvalidInputError):
        dst.copy_blocks_from(src, [0, 1], [0])
    with pytest.raises(E.KVInvalidInputError):
        dst.copy_blocks_from(src, [0, 9], [0, 1])  # a source id out of range
    other = KVStorage(4, 8, TINY)  # another block size: another block shape
    with pytest.raises(E.KVInvalidInputError):
        dst.copy_blocks_from(other, [0], [0])
    assert torch.equal(dst.kv, before)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_block_buffers_are_the_block_in_read_blocks_order(layout):
    st = _filled_storage(5, 3, layout)
    bufs = st.block_buffers(3)
    assert all(b.flags.writeable and b.flags.c_contiguous for b in bufs)
    flat = b"".join(bytes(b) for b in bufs)
    assert flat == bytes(st.read_blocks([3]).contiguous().view(torch.uint8).numpy().tobytes())
    for b in bufs:
        b[:] = 0  # writing through the buffers writes the block, nothing else
    assert not st.read_blocks([3]).any() and st.read_blocks([2, 4]).any()
    with pytest.raises(E.KVInvalidInputError):
        st.block_buffers(5)
