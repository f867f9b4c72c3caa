"""``DiskBlockStore.read_into``: a block file read straight into caller buffers, checked in place.

The payload is read in runs of at most ``_RUN_BYTES`` (one ``preadv`` each, the
header with the first, one byte past the end with the last) and each run is hashed
as it lands. Whatever the buffers' sizes and the run size, the bytes are those
``read`` (the reference path: a memmap of the whole payload) returns, and a
corrupted, truncated or extended file is refused whichever run it falls in.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVChecksumMismatchError, KVStorageError
from sagellm_kv_cache.offload import DiskBlockStore, disk
from sagellm_kv_cache.offload.faults import FaultyDiskIO, corrupt_block_file
from tests._offload_faults import store_with_two_blocks


def _pieces(n: int, size: int) -> list:
    return [np.zeros(size, dtype=np.uint8) for _ in range(n)]


def test_read_into_fills_the_buffers_in_order_and_checks_the_bytes(tmp_path):
    payload = bytes(range(256)) * 16
    store = DiskBlockStore(tmp_path / "kv", "geom", 4096)
    store.write(b"k1", payload)
    bufs = _pieces(4, 1024)
    store.read_into(b"k1", bufs)
    assert b"".join(bytes(b) for b in bufs) == payload
    corrupt_block_file(store, b"k1")
    with pytest.raises(KVChecksumMismatchError) as info:
        store.read_into(b"k1", _pieces(4, 1024))
    assert info.value.code == "KV_CHECKSUM_MISMATCH"
    with pytest.raises(KVStorageError) as missing:
        store.read_into(b"k2", _pieces(4, 1024))
    assert isinstance(missing.value.__cause__, FileNotFoundError)
    store.close()


def test_read_into_refuses_a_file_of_another_length_or_key(tmp_path):
    store = DiskBlockStore(tmp_path / "kv", "geom", 4096)
    store.write(7, b"\x07" * 4096)
    path = store.path_of(7)
    with open(path, "ab") as f:
        f.write(b"\x00")  # one byte more than the header says
    with pytest.raises(KVChecksumMismatchError):
        store.read_into(7, _pieces(2, 2048))
    path.rename(store.path_of(8))  # a file under another key's name
    with pytest.raises(KVChecksumMismatchError):
        store.read_into(8, _pieces(2, 2048))
    store.close()


def test_read_into_goes_through_the_fault_seam(tmp_path):
    store, io = store_with_two_blocks(tmp_path)
    io.fail_reads(errno.EIO, count=1)
    with pytest.raises(KVStorageError) as info:
        store.read_into(1, _pieces(1, 4096))
    assert info.value.errno == errno.EIO and io.num_failed_reads == 1
    bufs = _pieces(1, 4096)
    store.read_into(1, bufs)  # one fault only
    assert bytes(bufs[0]) == b"\x01" * 4096
    store.close()


def test_crc32_block_files_stay_readable(tmp_path, monkeypatch):
    """Files written without xxhash (checksum kind crc32) are read and checked by
    every reader, on open and per block."""
    monkeypatch.setattr(disk, "_XXH3", None)
    store = DiskBlockStore(tmp_path / "kv", "geom", 4096)
    store.write(1, b"\x01" * 4096)
    store.close()
    monkeypatch.undo()
    store = DiskBlockStore(tmp_path / "kv", "geom", 4096)
    assert list(store.scan()) == [1]  # verify_on_open checked the crc32
    assert bytes(store.read(1)) == b"\x01" * 4096
    bufs = _pieces(2, 2048)
    store.read_into(1, bufs)
    assert bytes(bufs[0]) + bytes(bufs[1]) == b"\x01" * 4096
    corrupt_block_file(store, 1)
    with pytest.raises(KVChecksumMismatchError):
        store.read_into(1, _pieces(2, 2048))
    store.close()


# -- runs: several preadv calls per block ---------------------------------------------------------
NBYTES = 3000


def _split(sizes: list[int]) -> list[int]:
    """Piece sizes adding up to ``NBYTES`` (the last takes the rest)."""
    out, left = [], NBYTES
    for s in sizes:
        if s >= left:
            break
        out.append(s)
        left -= s
    return [*out, left]


@given(
    sizes=st.lists(st.integers(1, 1200), max_size=8),
    run_bytes=st.integers(1, 4000),
    flip=st.none() | st.integers(0, NBYTES - 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_read_into_equals_read_for_any_runs_and_refuses_any_flipped_byte(
    tmp_path_factory, sizes, run_bytes, flip, seed
):
    """Differential: ``read_into`` in runs of ``run_bytes`` fills exactly the bytes ``read``
    returns; a byte flipped anywhere in the payload fails both, whichever run holds it."""
    d = tmp_path_factory.mktemp("kv")
    payload = np.random.default_rng(seed).integers(0, 256, NBYTES, dtype=np.uint8).tobytes()
    store = DiskBlockStore(d, "geom", NBYTES)
    store.write(b"k", payload)
    if flip is not None:
        with open(store.path_of(b"k"), "r+b") as f:
            f.seek(flip - NBYTES, os.SEEK_END)
            byte = f.read(1)
            f.seek(flip - NBYTES, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0x5A]))
    bufs = [np.zeros(n, dtype=np.uint8) for n in _split(sizes)]
    old = disk._RUN_BYTES
    disk._RUN_BYTES = run_bytes
    try:
        if flip is None:
            store.read_into(b"k", bufs)
            assert b"".join(bytes(b) for b in bufs) == bytes(store.read(b"k")) == payload
        else:
            with pytest.raises(KVChecksumMismatchError):
                store.read_into(b"k", bufs)
            with pytest.raises(KVChecksumMismatchError):
                store.read(b"k")
    finally:
        disk._RUN_BYTES = old
        store.close()


@pytest.mark.parametrize("delta", [-1, -700, 1, 700])
def test_read_into_refuses_a_file_cut_or_extended_in_any_run(tmp_path, monkeypatch, delta):
    monkeypatch.setattr(disk, "_RUN_BYTES", 1000)  # five runs of a 4096-byte block
    store = DiskBlockStore(tmp_path / "kv", "geom", 4096)
    store.write(1, b"\x01" * 4096)
    path = store.path_of(1)
    size = path.stat().st_size
    if delta < 0:
        os.truncate(path, size + delta)
    else:
        with open(path, "ab") as f:
            f.write(b"\x01" * delta)
    bufs = _pieces(4, 1024)
    with pytest.raises(KVChecksumMismatchError) as info:
        store.read_into(1, bufs)
    assert "malformed" in str(info.value)
    store.close()


def test_read_into_refuses_buffers_of_another_total_size(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "_RUN_BYTES", 1000)
    store = DiskBlockStore(tmp_path / "kv", "geom", 4096)
    store.write(1, b"\x01" * 4096)
    for bufs in (_pieces(3, 1024), _pieces(5, 1024), []):
        with pytest.raises(KVChecksumMismatchError):
            store.read_into(1, bufs)
    good = _pieces(4, 1024)
    store.read_into(1, good)
    assert all(bytes(b) == b"\x01" * 1024 for b in good)
    store.close()


def test_a_read_fault_in_a_later_run_is_a_typed_error_and_the_next_read_succeeds(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(disk, "_RUN_BYTES", 1000)

    class FailSecondCall(FaultyDiskIO):
        calls = 0

        def preadv(self, fd, buffers, offset):
            FailSecondCall.calls += 1
            if FailSecondCall.calls == 2:
                self.fail_reads(errno.EIO, count=1)
            return super().preadv(fd, buffers, offset)

    io = FailSecondCall()
    store = DiskBlockStore(tmp_path / "kv", "geom", 4096, io=io)
    store.write(1, b"\x01" * 4096)
    with pytest.raises(KVStorageError) as info:
        store.read_into(1, _pieces(4, 1024))
    assert info.value.errno == errno.EIO and io.num_failed_reads == 1
    assert FailSecondCall.calls == 2  # the read stopped at the failed run
    bufs = _pieces(4, 1024)
    store.read_into(1, bufs)
    assert b"".join(bytes(b) for b in bufs) == b"\x01" * 4096
    assert FailSecondCall.calls == 2 + 5  # runs of 1000, 1000, 1000, 1000 and 96 bytes
    store.close()


# -- the destination pieces: memoryviews of the storage, in block_buffers' order ---------------
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_block_views_are_the_block_buffers_pieces(layout, dtype):
    import torch

    from sagellm_kv_cache.errors import KVCacheError
    from sagellm_kv_cache.offload.staging import block_views
    from sagellm_kv_cache.storage import KVStorage, ModelShape

    s = KVStorage(5, 4, ModelShape(3, 2, 8, dtype), layout=layout)
    s.kv.copy_(torch.arange(s.kv.numel()).reshape(s.kv.shape).to(s.kv.dtype))
    views = block_views(s)
    before = s.kv.clone()
    for b in range(5):
        got = views(b)
        want = s.block_buffers(b)
        assert [bytes(v) for v in got] == [p.tobytes() for p in want]
        for v in got:
            v[:] = b"\xab" * v.nbytes  # writes land in block b only
        assert all(p.tobytes() == b"\xab" * p.nbytes for p in s.block_buffers(b))
        assert torch.equal(s.kv[:, :, b + 1 :], before[:, :, b + 1 :])
    for bad in (5, -1, True):
        with pytest.raises(KVCacheError) as views_err:
            views(bad)
        with pytest.raises(KVCacheError) as buffers_err:
            s.block_buffers(bad)
        assert type(views_err.value) is type(buffers_err.value)


def test_files_in_through_the_bounce_block_lands_each_block_in_its_own_slot(tmp_path):
    """A device storage that is not CPU memory is filled through one pinned CPU block
    (``bounce_block``): each file's bytes end in its own destination block. Run here
    with a CPU tensor under a non-CPU device name, so the path runs without a GPU."""
    from types import SimpleNamespace

    import torch

    from sagellm_kv_cache.offload.plan import FilesIn
    from sagellm_kv_cache.storage import KVStorage, ModelShape

    dst = KVStorage(4, 4, ModelShape(2, 2, 8, "float16"))
    src = KVStorage(2, 4, ModelShape(2, 2, 8, "float16"))
    src.kv.copy_(torch.randn(src.kv.shape).to(src.kv.dtype))
    nbytes = sum(p.nbytes for p in src.block_buffers(0))
    store = DiskBlockStore(tmp_path / "kv", "geom", nbytes)
    for b in (0, 1):
        store.write(b, b"".join(p.tobytes() for p in src.block_buffers(b)))
    dst.device = "cuda:0"  # the bounce path; the tensor stays on the CPU
    onboarding = SimpleNamespace(verified=set())
    FilesIn(SimpleNamespace(disk=store), [0, 1], [None, None], dst, [3, 1], [0, 1], onboarding).run(
        None
    )
    assert onboarding.verified == {0, 1}
    assert torch.equal(dst.kv[:, :, 3], src.kv[:, :, 0])
    assert torch.equal(dst.kv[:, :, 1], src.kv[:, :, 1])
    assert not dst.kv[:, :, [0, 2]].any()
    store.close()


@pytest.mark.skipif(not hasattr(os, "O_NOATIME"), reason="no O_NOATIME on this platform")
def test_read_into_falls_back_to_plain_reads_where_o_noatime_is_refused(tmp_path, monkeypatch):
    """O_NOATIME needs the file's owner: refused (EPERM), the store reads without it from then
    on; a plain open that is refused as well is a typed storage error."""
    store = DiskBlockStore(tmp_path / "kv", "geom", 4096)
    store.write(1, b"\x01" * 4096)
    real_open = os.open
    opened: list[int] = []

    def open_without_noatime(path, flags, *args, **kwargs):
        opened.append(flags)
        if flags & os.O_NOATIME:
            raise PermissionError(errno.EPERM, "not the owner")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(disk.os, "open", open_without_noatime)
    for _ in range(2):
        bufs = _pieces(4, 1024)
        store.read_into(1, bufs)
        assert b"".join(bytes(b) for b in bufs) == b"\x01" * 4096
    assert [bool(f & os.O_NOATIME) for f in opened] == [True, False, False]

    def refuse_all(path, flags, *args, **kwargs):
        raise PermissionError(errno.EACCES, "denied")

    monkeypatch.setattr(disk.os, "open", refuse_all)
    with pytest.raises(KVStorageError) as info:
        store.read_into(1, _pieces(4, 1024))
    assert info.value.errno == errno.EACCES
    monkeypatch.undo()
    store.close()
