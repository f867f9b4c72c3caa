"""The seed's handle-level KVOffloadManager methods, with real KV bytes.

device pool (8 blocks of 4 tokens, TINY shape) -> host copy -> NVMe file, and back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY

from sagellm_kv_cache.compat.offload_seed import OffloadSpec
from sagellm_kv_cache.errors import (
    KVBudgetExceededError,
    KVChecksumMismatchError,
    KVHandleNotFoundError,
    KVHandlePinnedError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVStorageError,
)
from sagellm_kv_cache.offload import KVOffloadManager
from sagellm_kv_cache.pool import KVPool

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def mgr(tmp_path):
    pool = KVPool(num_blocks=8, block_size=4, model_shape=TINY)
    m = KVOffloadManager(pool, [], async_copies=False)
    m.nvme_dir = tmp_path / "nvme"
    m.seed_clock = Clock()
    yield m
    m.close()


def kv_for(num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (TINY.num_layers, 2, num_tokens, TINY.num_kv_heads, TINY.head_dim)
    return torch.randn(*shape, generator=g).half()


def filled(m: KVOffloadManager, num_tokens: int, seed: int):
    h = m.device.alloc(num_tokens)
    kv = kv_for(num_tokens, seed)
    m.device.write_kv(h, kv)
    return h, kv


def flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def snapshot(m: KVOffloadManager) -> dict:
    m.device.check_invariants()
    s = m.device.get_stats()
    ids = m.registered_ids()
    return {
        "pool": {k: s[k] for k in ("free_blocks", "used_blocks", "cached_blocks", "num_handles")},
        "registered": m.registered_count(),
        "offloaded": m.offloaded_count(),
        "info": {i: m.get_handle_info(i) for i in ids},
    }


def test_offload_frees_device_blocks_and_restore_is_bit_exact(mgr):
    h, kv = filled(mgr, 10, seed=1)  # 3 blocks
    hid = h.handle_id
    mgr.register(h)
    assert (mgr.registered_count(), mgr.offloaded_count()) == (1, 0)
    assert mgr.current_device(hid) == "cpu" == mgr.device_name  # the device tier's name
    mgr.register(h2 := mgr.device.alloc(4), device="npu:0")
    assert mgr.current_device(h2.handle_id) == "npu:0"

    spec = mgr.offload(hid, request_id="r1")
    assert spec == OffloadSpec(hid, "cpu", "cpu", "explicit", 10, 3, kv.numel() * 2, "r1")
    assert mgr.is_offloaded(hid) and not mgr.is_on_nvme(hid) and mgr.offloaded_count() == 1
    assert h.is_freed and mgr.registered_handle(hid) is None
    assert mgr.device.get_stats()["used_blocks"] == 1  # only h2's block is held

    back = mgr.restore(hid, dst_device="npu:1")
    new = back.handle
    assert back.src_device == "cpu" and back.dst_device == "npu:1"
    assert mgr.registered_handle(hid) is new and new.num_tokens == 10
    assert torch.equal(mgr.device.read_kv(new), kv)
    info = mgr.get_handle_info(hid)
    assert (info["offloaded"], info["offload_count"], info["restore_count"]) == (False, 1, 1)
    assert info["current_device"] == "npu:1" and info["block_ids"] == new.block_ids
    assert mgr.get_offload_stats() == {
        "offloads": 1,
        "restores": 1,
        "nvme_offloads": 0,
        "nvme_restores": 0,
        "registered": 2,
        "offloaded": 0,
    }
    mgr.device.check_invariants()


def test_nvme_cascade_and_restores(mgr):
    h, kv = filled(mgr, 7, seed=2)
    hid = h.handle_id
    mgr.register(h)
    mgr.offload(hid)
    spec = mgr.offload_to_nvme(hid)
    path = Path(mgr.get_handle_info(hid)["path"])
    assert spec.src_device == "cpu" and spec.dst_device == "nvme" and path.exists()
    assert mgr.is_on_nvme(hid) and mgr.current_device(hid) == "nvme"
    assert path.stat().st_size == 24 + 5 * 8 + kv.numel() * 2  # header, dims, raw bytes
    mgr.restore_from_nvme(hid)  # to host memory
    assert not path.exists() and mgr.current_device(hid) == "cpu" and not mgr.is_on_nvme(hid)
    mgr.offload_to_nvme(hid, dst_device="nvme:/fast")
    new = mgr.restore_from_nvme(hid, dst_device="gpu").handle  # straight to the device
    assert torch.equal(mgr.device.read_kv(new), kv) and mgr.current_device(hid) == "gpu"
    # offload straight to NVMe, then restore from there
    mgr.offload(hid, dst_device="nvme")
    assert mgr.is_on_nvme(hid)
    assert torch.equal(mgr.device.read_kv(mgr.restore(hid).handle), kv)
    assert list(mgr.nvme_dir.iterdir()) == []
    assert mgr.get_offload_stats()["nvme_offloads"] == 3


@pytest.mark.parametrize(
    "damage, error, code",
    [
        (lambda p: p.write_bytes(flip_last(p.read_bytes())), KVChecksumMismatchError, None),
        (lambda p: p.write_bytes(p.read_bytes()[:-3]), KVStorageError, "KV_STORAGE_ERROR"),
        (lambda p: p.write_bytes(b"EVIL" + p.read_bytes()[4:]), KVStorageError, None),
        (lambda p: p.unlink(), KVStorageError, None),
    ],
)
def test_a_damaged_nvme_file_is_typed_and_changes_nothing(mgr, damage, error, code):
    h, _ = filled(mgr, 8, seed=3)
    hid = h.handle_id
    mgr.register(h)
    mgr.offload(hid, dst_device="nvme")
    path = Path(mgr.get_handle_info(hid)["path"])
    damage(path)
    before = snapshot(mgr)
    for call in (lambda: mgr.restore(hid), lambda: mgr.restore_from_nvme(hid)):
        with pytest.raises(error) as ei:
            call()
        assert code is None or ei.value.code == code
        assert snapshot(mgr) == before


def test_pinned_handles_are_never_offloaded(mgr):
    h, _ = filled(mgr, 8, seed=4)
    other, _ = filled(mgr, 8, seed=5)
    for x in (h, other):
        mgr.register(x)
    mgr.device.pin(h)
    mgr.seed_clock.t = 5.0
    mgr.touch(other.handle_id)  # h is the least recent, but pinned
    before = snapshot(mgr)
    with pytest.raises(KVHandlePinnedError) as ei:
        mgr.offload(h.handle_id)
    assert ei.value.code == "KV_HANDLE_PINNED" and snapshot(mgr) == before
    specs = mgr.maybe_offload(1.0, max_to_offload=5)
    assert [s.handle_id for s in specs] == [other.handle_id]
    assert not mgr.is_offloaded(h.handle_id)


def test_restore_without_room_raises_and_keeps_the_copy(mgr):
    h, kv = filled(mgr, 16, seed=6)  # 4 blocks
    mgr.register(h)
    mgr.offload(h.handle_id)
    filler = mgr.device.alloc(32)  # all 8 blocks
    before = snapshot(mgr)
    with pytest.raises(KVBudgetExceededError) as ei:
        mgr.restore(h.handle_id)
    assert ei.value.code in ("KV_POOL_FULL", "KV_BUDGET_EXCEEDED")
    assert snapshot(mgr) == before
    mgr.device.free(filler)
    assert torch.equal(mgr.device.read_kv(mgr.restore(h.handle_id).handle), kv)


def test_bad_input_is_typed_and_changes_nothing(mgr):
    h, _ = filled(mgr, 4, seed=7)
    mgr.register(h)
    on_dev = h.handle_id
    g, _ = filled(mgr, 4, seed=8)
    mgr.register(g)
    mgr.offload(g.handle_id)
    on_cpu = g.handle_id
    foreign = KVPool(num_blocks=2, block_size=4, model_shape=TINY).alloc(4)
    fresh = mgr.device.alloc(4)
    rows = [
        (lambda: mgr.current_device("nope"), KVHandleNotFoundError),
        (lambda: mgr.is_offloaded(3), KVInvalidTypeError),
        (lambda: mgr.touch("nope"), KVHandleNotFoundError),
        (lambda: mgr.unregister("nope"), KVHandleNotFoundError),
        (lambda: mgr.get_handle_info(None), KVInvalidTypeError),
        (lambda: mgr.register(h), KVInvalidInputError),  # twice
        (lambda: mgr.register(foreign), KVInvalidHandleError),
        (lambda: mgr.register("h"), KVInvalidTypeError),
        (lambda: mgr.register(fresh, device=""), KVInvalidInputError),
        (lambda: mgr.offload(on_dev, dst_device=""), KVInvalidInputError),
        (lambda: mgr.restore(on_dev), KVInvalidInputError),
        (lambda: mgr.offload_to_nvme(on_dev), KVInvalidInputError),
        (lambda: mgr.offload_to_nvme(on_cpu, dst_device="disk"), KVInvalidInputError),
        (lambda: mgr.restore_from_nvme(on_cpu), KVInvalidInputError),
        (lambda: mgr.maybe_offload(1.5), KVInvalidInputError),
        (lambda: mgr.maybe_offload("high"), KVInvalidTypeError),
        (lambda: mgr.maybe_offload(True), KVInvalidTypeError),
        (lambda: mgr.maybe_offload(0.99, max_to_offload=-1), KVInvalidInputError),
        (lambda: mgr.maybe_offload_idle(idle_s=-1), KVInvalidInputError),
        (lambda: mgr.maybe_cascade_to_nvme(0.99, nvme_device="ssd"), KVInvalidInputError),
        (lambda: mgr.maybe_cascade_to_nvme(2), KVInvalidInputError),
    ]
    for call, error in rows:
        before = snapshot(mgr)
        with pytest.raises(error) as ei:
            call()
        assert ei.value.code == error.code
        assert snapshot(mgr) == before
    mgr.max_offloaded_handles = 1
    before = snapshot(mgr)
    with pytest.raises(KVBudgetExceededError):
        mgr.offload(on_dev)
    assert snapshot(mgr) == before
    assert mgr.maybe_offload(1.0) == []  # the limit stops the trigger too


def test_maybe_offload_takes_least_recent_until_below_the_threshold(mgr):
    handles = [filled(mgr, 8, seed=10 + i)[0] for i in range(4)]  # 2 blocks each: pool full
    for x in handles:
        mgr.register(x)
    for t, i in enumerate((2, 0, 3, 1)):  # least recent first: 2, 0, 3, 1
        mgr.seed_clock.t = float(t)
        mgr.touch(handles[i].handle_id)
    ids = [x.handle_id for x in handles]
    assert mgr.maybe_offload(0.80) == []  # at or below 0.85: nothing
    # measured: 8/8 used; one offload frees 2 blocks -> 0.75 <= 0.85
    assert [s.handle_id for s in mgr.maybe_offload()] == [ids[2]]
    # given 1.0 with threshold 0.5: 1.0 -> 0.75 -> 0.5, two handles
    mgr.offload_threshold = 0.5
    specs = mgr.maybe_offload(1.0)
    assert [s.handle_id for s in specs] == [ids[0], ids[3]]
    assert all(s.trigger == "memory_pressure" for s in specs)
    assert mgr.offloaded_count() == 3 and mgr.device.get_stats()["used_blocks"] == 2
    assert mgr.maybe_offload(1.0, npu_device="npu:9") == []  # no handle on that label


def test_maybe_offload_idle_uses_idle_offload_secs(mgr):
    handles = [filled(mgr, 4, seed=20 + i)[0] for i in range(3)]
    for i, x in enumerate(handles):
        mgr.seed_clock.t = float(i * 10)  # active at 0, 10, 20
        mgr.register(x)
    mgr.seed_clock.t = 25.0
    assert mgr.maybe_offload_idle() == []  # idle_offload_secs is None
    mgr.idle_offload_secs = 12
    specs = mgr.maybe_offload_idle()  # idle 25 and 15 s > 12
    assert [s.handle_id for s in specs] == [handles[0].handle_id, handles[1].handle_id]
    assert specs[0].trigger == "idle_sequence"
    assert [s.handle_id for s in mgr.maybe_offload_idle(idle_s=1)] == [handles[2].handle_id]


def test_maybe_cascade_to_nvme_moves_least_recent_host_handles(mgr):
    handles = [filled(mgr, 4, seed=30 + i)[0] for i in range(3)]
    for i, x in enumerate(handles):
        mgr.seed_clock.t = float(i)
        mgr.register(x)
        mgr.offload(x.handle_id)
    assert mgr.maybe_cascade_to_nvme() == []  # no cpu_capacity_bytes: utilisation 0
    assert mgr.maybe_cascade_to_nvme(0.5) == []  # below 0.90
    specs = mgr.maybe_cascade_to_nvme(0.95, max_to_cascade=2)
    assert [s.handle_id for s in specs] == [handles[0].handle_id, handles[1].handle_id]
    assert [mgr.is_on_nvme(x.handle_id) for x in handles] == [True, True, False]
    nbytes = mgr.get_handle_info(handles[2].handle_id)["nbytes"]
    mgr.cpu_capacity_bytes = nbytes  # the one host copy fills it: utilisation 1.0
    assert [s.handle_id for s in mgr.maybe_cascade_to_nvme()] == [handles[2].handle_id]


def test_offload_keeps_blocks_another_live_handle_shares(mgr):
    tokens = list(range(8))
    a, _ = mgr.device.alloc_with_prefix(tokens)
    kv = kv_for(8, seed=40)
    mgr.device.write_kv(a, kv)
    mgr.device.cache_blocks(a)
    b, hit = mgr.device.alloc_with_prefix(tokens + [99, 98, 97, 96])  # shares a's 2 blocks
    assert hit == 8
    mgr.device.write_kv(b, kv_for(4, seed=41), start_token=8)
    full_b = mgr.device.read_kv(b)
    mgr.register(b)
    assert mgr.blocks_freed_by_offload(b) == 1  # only its own last block
    mgr.offload(b.handle_id)
    assert torch.equal(mgr.device.read_kv(a), kv)  # a's KV untouched and still held
    assert mgr.device.get_stats()["used_blocks"] == 2
    assert torch.equal(mgr.device.read_kv(mgr.restore(b.handle_id).handle), full_b)


def test_unregister_drops_an_offloaded_copy(mgr):
    h, _ = filled(mgr, 4, seed=50)
    mgr.register(h)
    mgr.offload(h.handle_id, dst_device="nvme")
    path = Path(mgr.get_handle_info(h.handle_id)["path"])
    mgr.unregister(h.handle_id)
    assert not path.exists() and mgr.registered_count() == 0
    with pytest.raises(KVHandleNotFoundError):
        mgr.is_on_nvme(h.handle_id)
