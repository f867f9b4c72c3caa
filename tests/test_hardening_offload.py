"""Hardening of the tiered offload (issue 11, defects 1 and 12).

1. A block onboarded from a lower tier is hittable only once its bytes are in
   place and verified; a failed onboarding is a miss for every request (they
   recompute), its bad copy is dropped, nothing leaks.
12. The disk tier: typed errors, index equal to the files after any failure,
    a full disk means "not stored", a deleted file means a miss, and the
    directory lock survives the unlinking of any file in it.

Faults are injected through the documented seam (``offload/faults.py``),
never by filling a real disk; timing never decides a test (the copy worker is
held on an ``Event`` where a test needs an onboarding in flight).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from sagellm_kv_cache.errors import (
    KVCacheError,
    KVChecksumMismatchError,
    KVStorageError,
    KVStorageLockedError,
)
from sagellm_kv_cache.offload import DiskBlockStore, KVOffloadManager
from sagellm_kv_cache.offload.faults import FaultyDiskIO, corrupt_block_file, delete_block_file
from sagellm_kv_cache.storage import ModelShape
from tests._offload_faults import (
    FAULTS,
    check_tiers_and_files,
    inject_fault,
    store_with_two_blocks,
)

SHAPE = ModelShape(2, 2, 8, "float16")
BS = 4
ROOT = Path(__file__).resolve().parents[1]


def make_manager(tmp_path, *, gpu=4, cpu=0, disk=8, **kwargs) -> KVOffloadManager:
    caps = {"gpu": gpu}
    if cpu:
        caps["cpu"] = cpu
    caps["disk"] = disk
    return KVOffloadManager.from_capacities(
        caps, block_size=BS, model_shape=SHAPE, disk_dir=str(tmp_path / "kv"), **kwargs
    )


def make_kv(seed: int, num_tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 64, 2, 8, generator=g).half()[:, :, :num_tokens].contiguous()


def prompt(i: int, num_blocks: int = 2) -> list[int]:
    return list(range(1000 * i, 1000 * i + num_blocks * BS))


def finish(m: KVOffloadManager, alloc, i: int) -> None:
    """What an engine does after the wait: compute from the verified prefix, cache, free."""
    n = alloc.handle.num_tokens
    hit = alloc.handle.num_cached_tokens
    if hit < n:
        m.device.write_kv(alloc.handle, make_kv(i, n)[:, :, hit:], start_token=hit)
    m.cache_blocks(alloc.handle)
    m.free(alloc.handle)


def run_request(m: KVOffloadManager, i: int, num_blocks: int = 2):
    alloc = m.allocate(prompt(i, num_blocks))
    alloc.wait(10)
    finish(m, alloc, i)
    return alloc


def disk_of(m: KVOffloadManager) -> DiskBlockStore:
    return m.tiers[-1].disk


def assert_index_equals_files(m: KVOffloadManager) -> None:
    m.wait_all(10)
    m.check_invariants()  # settles finished jobs, then compares index and files
    store = disk_of(m)
    assert set(store.keys()) == set(m.tiers[-1].pool.cached)
    assert not list(store.directory.glob(".tmp-*"))


def assert_nothing_held(m: KVOffloadManager) -> None:
    m.check_invariants()
    stats = m.device.get_stats()
    assert stats["used_blocks"] == 0 and stats["num_handles"] == 0
    assert stats["free_blocks"] + stats["evictable_blocks"] == m.device.num_blocks


def hit_kv_is_what_was_written(m: KVOffloadManager, i: int) -> None:
    alloc = m.allocate(prompt(i))
    assert alloc.lookup.tiers == ["gpu", "gpu"]
    alloc.wait(10)
    assert alloc.handle.num_cached_tokens == 2 * BS
    assert torch.equal(m.device.read_kv(alloc.handle), make_kv(i, 2 * BS))
    m.free(alloc.handle)


def request_0_on_disk(tmp_path) -> tuple[KVOffloadManager, list, FaultyDiskIO]:
    """Requests 0..2 run on a 4-block device over a disk tier: request 0's two blocks
    are on disk only. Returns the manager, request 0's hashes and the disk tier's
    ``FaultyDiskIO`` (healthy until told otherwise)."""
    m = make_manager(tmp_path, gpu=4, disk=8)
    for i in range(3):
        run_request(m, i)
    io = FaultyDiskIO()
    disk_of(m).io = io
    return m, m.device.compute_block_hashes(prompt(0)), io


# -- defect 1: a failed onboarding is never hit ---------------------------------------------------


@pytest.mark.parametrize("async_copies", [False, True], ids=["inline", "async-in-flight"])
def test_a_failed_onboarding_is_never_hit_and_every_request_recomputes(tmp_path, async_copies):
    m = make_manager(tmp_path, gpu=4, disk=8, async_copies=async_copies)
    for i in range(3):
        run_request(m, i)
    h0 = m.device.compute_block_hashes(prompt(0))
    assert [m.where(h) for h in h0] == [["disk"], ["disk"]]
    store = disk_of(m)
    corrupt_block_file(store, h0[0])
    gate = threading.Event()
    if async_copies:  # hold the worker: B is planned while A's copies are in flight
        io = FaultyDiskIO()
        io.read_gate = gate
        store.io = io
    a = m.allocate(prompt(0))
    b = m.allocate(prompt(0))
    assert a.lookup.tiers == ["disk", "disk"]
    assert b.lookup.tiers == []  # A's blocks are not hittable: not verified yet (or never)
    gate.set()
    ra = a.wait(10)
    assert ra.blocks_onboarded == {"gpu": 0, "disk": 0}
    assert ra.blocks_failed == {"gpu": 0, "disk": 2}
    assert [type(e) for e in ra.errors] == [KVChecksumMismatchError]
    assert ra.errors[0].code == "KV_CHECKSUM_MISMATCH"
    assert a.handle.num_cached_tokens == 0  # recompute everything
    b.wait(10)
    assert b.handle.num_cached_tokens == 0
    # the bad copy is gone from the index and the directory; the next request recomputes
    assert [m.where(h) for h in h0] == [[], []]
    assert not store.path_of(h0[0]).exists()
    assert m.get_stats()["tiers"]["disk"]["read_errors"] == 1
    assert m.lookup(h0).tiers == []
    finish(m, a, 0)
    finish(m, b, 0)
    assert_nothing_held(m)
    assert_index_equals_files(m)
    hit_kv_is_what_was_written(m, 0)
    m.close()


def test_an_onboarding_in_flight_is_a_miss_until_its_bytes_arrived(tmp_path):
    m, h0, io = request_0_on_disk(tmp_path)
    io.read_gate = threading.Event()
    a = m.allocate(prompt(0))
    assert a.lookup.tiers == ["disk", "disk"]
    # in flight: in no tier's index, not matched by the device pool
    assert m.lookup(h0).tiers == []
    assert m.device.match_prefix(block_hashes=h0) == ([], 0)
    b = m.allocate(prompt(0))
    assert b.lookup.tiers == []
    io.read_gate.set()
    ra = a.wait(10)
    assert ra.blocks_onboarded == {"gpu": 0, "disk": 2}
    assert ra.blocks_failed == {"gpu": 0, "disk": 0} and ra.errors == []
    assert a.handle.num_cached_tokens == 2 * BS
    assert torch.equal(m.device.read_kv(a.handle), make_kv(0, 2 * BS))
    assert m.lookup(h0).tiers == ["gpu", "gpu"]  # verified: hittable from now on
    b.wait(10)
    finish(m, b, 0)  # B computed the same blocks: A's stay the cached ones
    m.free(a.handle)
    assert_nothing_held(m)
    assert_index_equals_files(m)
    hit_kv_is_what_was_written(m, 0)
    m.close()


def test_an_inclusive_tier_drops_only_the_bad_copy(tmp_path):
    m = make_manager(tmp_path, gpu=4, disk=8, promote_on_hit=False)
    for i in range(3):
        run_request(m, i)
    h0 = m.device.compute_block_hashes(prompt(0))
    corrupt_block_file(disk_of(m), h0[1])
    a = m.allocate(prompt(0))
    assert a.lookup.tiers == ["disk", "disk"]
    ra = a.wait(10)
    assert ra.blocks_onboarded == {"gpu": 0, "disk": 1}
    assert ra.blocks_failed == {"gpu": 0, "disk": 1}
    assert a.handle.num_cached_tokens == BS
    assert torch.equal(m.device.read_kv(a.handle, num_tokens=BS), make_kv(0, BS))
    assert [m.where(h) for h in h0] == [["gpu", "disk"], []]
    finish(m, a, 0)
    assert_nothing_held(m)
    assert_index_equals_files(m)
    hit_kv_is_what_was_written(m, 0)
    m.close()


def test_an_exclusive_chain_drops_a_lower_copy_the_device_computed_again(tmp_path):
    """Found by the stateful test: a block behind a miss is computed on the device while a
    lower tier holds it; the chain must still hold each block once."""
    m = make_manager(tmp_path, gpu=4, cpu=8, disk=4)
    for i in range(3):
        run_request(m, i)
    h0 = m.device.compute_block_hashes(prompt(0))
    assert [m.where(h) for h in h0] == [["cpu"], ["cpu"]]
    assert m.invalidate([h0[0]]) == 1  # block 1 now sits behind a miss
    a = m.allocate(prompt(0))
    assert a.lookup.tiers == []
    a.wait(10)
    finish(m, a, 0)
    assert [m.where(h) for h in h0] == [["gpu"], ["gpu"]]
    m.check_invariants()
    hit_kv_is_what_was_written(m, 0)
    m.close()


# -- defect 12: the disk tier ---------------------------------------------------------------------


def test_a_deleted_block_file_is_a_typed_storage_error(tmp_path):
    store, _ = store_with_two_blocks(tmp_path)
    assert delete_block_file(store, 2)
    with pytest.raises(KVStorageError) as info:
        store.read(2)
    assert info.value.code == "KV_STORAGE_ERROR"
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert bytes(store.read(1)) == b"\x01" * 4096
    store.close()


def test_a_failed_read_is_a_typed_storage_error(tmp_path):
    store, io = store_with_two_blocks(tmp_path)
    io.fail_reads(errno.EIO, count=1)
    with pytest.raises(KVStorageError) as info:
        store.read(1)
    assert info.value.code == "KV_STORAGE_ERROR"
    assert info.value.errno == errno.EIO and info.value.__cause__.errno == errno.EIO
    assert bytes(store.read(1)) == b"\x01" * 4096  # one fault only
    store.close()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_leaves_no_file_and_a_typed_error(tmp_path, err):
    store, io = store_with_two_blocks(tmp_path)
    io.fail_writes(err)
    with pytest.raises(KVStorageError) as info:
        store.write(3, b"\x03" * 4096)
    assert info.value.code == "KV_STORAGE_ERROR"
    assert info.value.errno == err and isinstance(info.value.__cause__, OSError)
    assert sorted(store.keys()) == [1, 2]
    assert sorted(p.name for p in store.directory.iterdir()) == ["i1.kvb", "i2.kvb"]
    io.heal()
    store.write(3, b"\x03" * 4096)
    assert bytes(store.read(3)) == b"\x03" * 4096
    store.close()


def test_a_deleted_block_file_is_a_miss_and_the_request_recomputes(tmp_path):
    m, h0, _ = request_0_on_disk(tmp_path)
    assert delete_block_file(disk_of(m), h0[1])
    a = m.allocate(prompt(0))
    assert a.lookup.tiers == ["disk", "disk"]
    ra = a.wait(10)
    assert [(type(e), e.code) for e in ra.errors] == [(KVStorageError, "KV_STORAGE_ERROR")]
    assert isinstance(ra.errors[0].__cause__, FileNotFoundError)
    assert a.handle.num_cached_tokens == BS  # block 0 arrived; block 1 is recomputed
    assert torch.equal(m.device.read_kv(a.handle, num_tokens=BS), make_kv(0, BS))
    assert [m.where(h) for h in h0] == [["gpu"], []]
    assert m.get_stats()["tiers"]["disk"]["read_errors"] == 1
    finish(m, a, 0)
    assert_nothing_held(m)
    assert_index_equals_files(m)
    hit_kv_is_what_was_written(m, 0)
    m.close()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_means_not_stored_never_an_unrelated_failure(tmp_path, err):
    m = make_manager(tmp_path, gpu=4, disk=8)
    io = FaultyDiskIO()
    disk_of(m).io = io
    io.fail_writes(err)
    run_request(m, 0)
    run_request(m, 1)
    h0 = m.device.compute_block_hashes(prompt(0))
    c = m.allocate(prompt(2))  # evicts request 0 from the device: its spill cannot be written
    assert c.evicted_hashes == [h0[1], h0[0]]
    rc = c.wait(10)  # the unrelated request is fine
    assert rc.errors == [] and rc.blocks_spilled == 2
    finish(m, c, 2)
    assert_index_equals_files(m)
    assert [m.where(h) for h in h0] == [[], []]
    disk = m.get_stats()["tiers"]["disk"]
    assert disk["write_errors"] == 2 and disk["resident_blocks"] == 0
    io.heal()
    run_request(m, 3)  # evicts request 1: stored now
    h1 = m.device.compute_block_hashes(prompt(1))
    assert [m.where(h) for h in h1] == [["disk"], ["disk"]]
    a = m.allocate(prompt(0))
    assert a.lookup.tiers == []  # not stored means a miss: recompute
    a.wait(10)
    finish(m, a, 0)
    assert_nothing_held(m)
    assert_index_equals_files(m)
    hit_kv_is_what_was_written(m, 0)
    m.close()


def test_a_failed_read_leaves_no_orphan_file(tmp_path):
    m, h0, io = request_0_on_disk(tmp_path)
    io.fail_reads(errno.EIO, count=1)
    a = m.allocate(prompt(0))
    ra = a.wait(10)
    assert [e.code for e in ra.errors] == ["KV_STORAGE_ERROR"]
    assert a.handle.num_cached_tokens == 0
    m.wait_all(10)  # the promoted blocks' files go in a second copy plan, after this one
    assert not disk_of(m).path_of(h0[0]).exists() and not disk_of(m).path_of(h0[1]).exists()
    assert_index_equals_files(m)
    finish(m, a, 0)
    assert_nothing_held(m)
    m.close()


def test_a_second_store_is_refused_even_after_the_lock_file_is_unlinked(tmp_path):
    first = DiskBlockStore(tmp_path, "g", 16)
    for name in os.listdir(tmp_path):  # whatever a store keeps there: none of it is the lock
        os.unlink(tmp_path / name)
    with pytest.raises(KVStorageLockedError) as info:
        DiskBlockStore(tmp_path, "g", 16)
    assert info.value.code == "KV_STORAGE_LOCKED"
    assert isinstance(info.value, KVStorageError) and isinstance(info.value, KVCacheError)
    first.close()
    DiskBlockStore(tmp_path, "g", 16).close()  # free again once closed


_SECOND_STORE = textwrap.dedent(
    """
    import sys
    from sagellm_kv_cache.errors import KVStorageLockedError
    from sagellm_kv_cache.offload import DiskBlockStore
    try:
        DiskBlockStore(sys.argv[1], "g", 16).close()
    except KVStorageLockedError as exc:
        print(exc.code)
        sys.exit(3)
    print("OPENED")
    """
)


def _second_store_in_a_subprocess(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _SECOND_STORE, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_second_process_cannot_open_a_directory_in_use(tmp_path):
    first = DiskBlockStore(tmp_path, "g", 16)
    for name in os.listdir(tmp_path):
        os.unlink(tmp_path / name)
    try:
        done = _second_store_in_a_subprocess(tmp_path)
        assert (done.returncode, done.stdout.strip()) == (3, "KV_STORAGE_LOCKED"), done.stderr
    finally:
        first.close()
    done = _second_store_in_a_subprocess(tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, "OPENED"), done.stderr


# -- property: random traffic with injected disk faults --------------------------------------------

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sagellm_kv_cache.errors import KVBudgetExceededError  # noqa: E402
from sagellm_kv_cache.offload import TierConfig  # noqa: E402
from sagellm_kv_cache.pool import KVPool  # noqa: E402

NUM_PROMPTS = 5
MAX_BLOCKS = 3
_READ_ERRORS = {"KV_CHECKSUM_MISMATCH", "KV_STORAGE_ERROR"}


def _expected_by_hash() -> dict:
    """Block hash -> the KV written under it (prompt i's block j, whatever the prompt length)."""
    pool = KVPool(num_blocks=1, block_size=BS)
    out = {}
    for i in range(NUM_PROMPTS):
        kv = make_kv(i, MAX_BLOCKS * BS)
        for j, h in enumerate(pool.compute_block_hashes(prompt(i, MAX_BLOCKS))):
            out[h] = kv[:, :, j * BS : (j + 1) * BS]
    return out


EXPECTED = _expected_by_hash()


class OffloadFaultMachine(RuleBasedStateMachine):
    """A gpu/cpu/disk manager driven like an engine, with disk faults injected between steps."""

    def __init__(self) -> None:
        super().__init__()
        self.m: KVOffloadManager | None = None
        self.live: list[list] = []  # [alloc, prompt id, written]
        self.deleted: set = set()  # files removed behind the store's back, not yet noticed

    @initialize(
        async_copies=st.booleans(),
        promote_on_hit=st.booleans(),
        write_policy=st.sampled_from(["write_back", "write_through"]),
    )
    def setup(self, async_copies, promote_on_hit, write_policy):
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="kv-offload-faults-")
        pool = KVPool(num_blocks=5, block_size=BS, model_shape=SHAPE)
        tiers = [
            TierConfig("cpu", 3),
            TierConfig("disk", 4, "disk", directory=self.dir, fsync=False),
        ]
        self.m = KVOffloadManager(
            pool,
            tiers,
            device_tier_name="gpu",
            async_copies=async_copies,
            promote_on_hit=promote_on_hit,
            write_policy=write_policy,
        )
        self.io = FaultyDiskIO()
        self.store = self.m.tiers[-1].disk
        self.store.io = self.io

    def teardown(self) -> None:
        import shutil

        if self.m is not None:
            self.m.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- engine traffic ------------------------------------------------------
    def _allocate(self, i: int, num_blocks: int):
        try:
            alloc = self.m.allocate(prompt(i, num_blocks))
        except KVBudgetExceededError:
            return None
        result = alloc.wait(10)
        hit = alloc.handle.num_cached_tokens
        assert hit <= alloc.lookup.num_hit_tokens and hit % BS == 0
        assert hit >= alloc.lookup.num_device_hit_blocks * BS
        for e in result.errors:
            assert isinstance(e, KVCacheError) and e.code in _READ_ERRORS, repr(e)
        if not result.errors:
            assert hit == alloc.lookup.num_hit_tokens
        if hit:  # every hit is exactly what was written under its hash
            got = self.m.device.read_kv(alloc.handle, num_tokens=hit)
            assert torch.equal(got, make_kv(i, MAX_BLOCKS * BS)[:, :, :hit])
        return alloc

    def _compute_and_cache(self, alloc, i: int) -> None:
        n, hit = alloc.handle.num_tokens, alloc.handle.num_cached_tokens
        if hit < n:
            self.m.device.write_kv(alloc.handle, make_kv(i, n)[:, :, hit:], start_token=hit)
        self.m.cache_blocks(alloc.handle)

    @precondition(lambda self: self.m is not None)
    @rule(i=st.integers(0, NUM_PROMPTS - 1), num_blocks=st.integers(1, MAX_BLOCKS))
    def request(self, i, num_blocks):
        """One whole request: allocate, wait, compute the misses, cache, free."""
        alloc = self._allocate(i, num_blocks)
        if alloc is not None:
            self._compute_and_cache(alloc, i)
            self.m.free(alloc.handle)

    @precondition(lambda self: self.m is not None and len(self.live) < 2)
    @rule(i=st.integers(0, NUM_PROMPTS - 1), num_blocks=st.integers(1, MAX_BLOCKS))
    def start_request(self, i, num_blocks):
        """A request that stays running (overlaps the next ones)."""
        alloc = self._allocate(i, num_blocks)
        if alloc is not None:
            self.live.append([alloc, i, False])

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), cache=st.booleans())
    def end_request(self, data, cache):
        entry = data.draw(st.sampled_from(self.live))
        alloc, i, _ = entry
        if cache:
            self._compute_and_cache(alloc, i)
        self.m.free(alloc.handle)
        self.live.remove(entry)

    @precondition(lambda self: self.m is not None)
    @rule(n=st.integers(1, 3))
    def evict(self, n):
        self.m.evict(n).result(10)

    # -- faults --------------------------------------------------------------
    @precondition(lambda self: self.m is not None)
    @rule(fault=FAULTS, data=st.data())
    def inject(self, fault, data):
        inject_fault(self, fault, data)

    # -- after every step ----------------------------------------------------
    @invariant()
    def consistent(self):
        m = self.m
        if m is None:
            return
        check_tiers_and_files(self)
        # no leaked device blocks: exactly the live handles' blocks are in use
        held = {b for alloc, _, _ in self.live for b in alloc.handle.block_ids}
        stats = m.device.get_stats()
        assert stats["used_blocks"] == len(held)
        assert stats["num_handles"] == len(self.live)
        # every cached block on the device and in host memory holds what was written under it
        storage = m.device.storage
        for h, b in m.device.block_pool.cached.items():
            got = storage.read_blocks([b]).reshape(EXPECTED[h].shape)
            assert torch.equal(got, EXPECTED[h]), f"device block {b} differs from its hash"
        for h in m.tiers[0].pool.cached:
            tier, data = m.read_block(h)
            if tier == "cpu":
                assert torch.equal(data.reshape(EXPECTED[h].shape), EXPECTED[h])


TestOffloadFaultMachine = OffloadFaultMachine.TestCase
TestOffloadFaultMachine.settings = settings(
    max_examples=int(os.environ.get("OFFLOAD_FAULT_EXAMPLES", "100")),
    stateful_step_count=int(os.environ.get("OFFLOAD_FAULT_STEPS", "60")),
)
