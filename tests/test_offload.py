"""Tiered offload: spill down, bit-exact onboarding, disk restart and crash safety, budgets."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sagellm_kv_cache.errors import (
    KVBudgetExceededError,
    KVChecksumMismatchError,
    KVConfigError,
    KVStorageLockedError,
)
from sagellm_kv_cache.offload import DiskBlockStore, KVOffloadManager, TierConfig
from sagellm_kv_cache.offload.disk import block_file_name
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.storage import ModelShape

SHAPE = ModelShape(2, 2, 8, "float16")
BS = 4


def make_manager(tmp_path=None, *, gpu=4, cpu=8, disk=0, **kwargs) -> KVOffloadManager:
    caps = {"gpu": gpu}
    if cpu:
        caps["cpu"] = cpu
    if disk:
        caps["disk"] = disk
    return KVOffloadManager.from_capacities(
        caps,
        block_size=BS,
        model_shape=SHAPE,
        disk_dir=str(tmp_path / "kv") if disk else None,
        **kwargs,
    )


def make_kv(seed: int, num_tokens: int) -> torch.Tensor:
    """KV of prompt ``seed``'s first ``num_tokens`` tokens (a prefix of a longer prompt's)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 64, 2, 8, generator=g).half()[:, :, :num_tokens].contiguous()


def prompt(i: int, num_blocks: int = 2) -> list[int]:
    return list(range(1000 * i, 1000 * i + num_blocks * BS))


def run_request(m: KVOffloadManager, i: int, num_blocks: int = 2):
    """Allocate prompt i, write its KV (seeded by i) into the uncached part, cache, free."""
    toks = prompt(i, num_blocks)
    alloc = m.allocate(toks)
    alloc.wait(10)
    hit = alloc.handle.num_cached_tokens
    if hit < len(toks):
        m.device.write_kv(alloc.handle, make_kv(i, len(toks))[:, :, hit:], start_token=hit)
    m.cache_blocks(alloc.handle)
    m.free(alloc.handle)
    return alloc


def test_blocks_spill_down_lru_first_and_come_back_bit_exact():
    m = make_manager(gpu=4, cpu=8)
    a = run_request(m, 0)
    hashes_a = list(a.handle.block_hashes)
    run_request(m, 1)
    # the device holds 4 blocks: request 2 evicts request 0's, tail first
    c = run_request(m, 2)
    assert c.evicted_hashes == [hashes_a[1], hashes_a[0]]
    assert [m.where(h) for h in hashes_a] == [["cpu"], ["cpu"]]
    cpu = m.tiers[0]
    # inserted at the most recent end in eviction order: suffix first out of the cpu tier too
    assert [cpu.pool.block_hashes[b] for b in cpu.pool.policy.peek_victims(8)] == [
        hashes_a[1],
        hashes_a[0],
    ]
    again = m.allocate(prompt(0))
    assert again.lookup.tiers == ["cpu", "cpu"]
    assert again.lookup.hits_per_tier == {"gpu": 0, "cpu": 2}
    result = again.wait(10)
    assert result.blocks_onboarded == {"gpu": 0, "cpu": 2}
    assert again.handle.num_cached_tokens == 2 * BS
    assert torch.equal(m.device.read_kv(again.handle), make_kv(0, 2 * BS))
    # exclusive: promoted blocks left the cpu tier
    assert [m.where(h) for h in hashes_a] == [["gpu"], ["gpu"]]
    m.free(again.handle)
    stats = m.get_stats()["tiers"]
    assert stats["cpu"]["hit_blocks"] == 2
    assert stats["cpu"]["bytes_out"] == 2 * SHAPE.bytes_per_block(BS)
    assert stats["gpu"]["bytes_in"] == 2 * SHAPE.bytes_per_block(BS)
    m.check_invariants()
    m.close()


def test_three_tiers_disk_hit_is_bit_exact(tmp_path):
    m = make_manager(tmp_path, gpu=2, cpu=2, disk=8)
    for i in range(4):
        run_request(m, i)
    # request 0 went gpu -> cpu -> disk
    hashes0 = m.device.compute_block_hashes(prompt(0))
    assert [m.where(h) for h in hashes0] == [["disk"], ["disk"]]
    tier, data = m.read_block(hashes0[1])
    assert tier == "disk"
    assert torch.equal(data.reshape(2, 2, BS, 2, 8), make_kv(0, 2 * BS)[:, :, BS:])
    alloc = m.allocate(prompt(0))
    assert alloc.lookup.tiers == ["disk", "disk"]
    alloc.wait(10)
    assert torch.equal(m.device.read_kv(alloc.handle), make_kv(0, 2 * BS))
    m.free(alloc.handle)
    m.check_invariants()
    m.close()


def test_disk_blocks_survive_a_restart(tmp_path):
    m = make_manager(tmp_path, gpu=2, cpu=0, disk=8)
    for i in range(3):
        run_request(m, i)
    on_disk = sorted(p.name for p in (tmp_path / "kv").glob("*.kvb"))
    assert len(on_disk) == 4  # requests 0 and 1; request 2 is on the device
    m.close()
    m2 = make_manager(tmp_path, gpu=2, cpu=0, disk=8)
    assert len(m2.tiers[0].pool.cached) == 4
    for i in (0, 1):
        alloc = m2.allocate(prompt(i))
        assert alloc.lookup.tiers == ["disk", "disk"]
        alloc.wait(10)
        assert torch.equal(m2.device.read_kv(alloc.handle), make_kv(i, 2 * BS))
        m2.free(alloc.handle)
    m2.check_invariants()
    m2.close()


def test_a_second_store_cannot_open_a_directory_in_use(tmp_path):
    with DiskBlockStore(tmp_path, "g", 16), pytest.raises(KVStorageLockedError):
        DiskBlockStore(tmp_path, "g", 16)
    DiskBlockStore(tmp_path, "g", 16).close()  # free again once closed


_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from sagellm_kv_cache.offload import DiskBlockStore
    store = DiskBlockStore(sys.argv[1], "geom", 64 << 20)
    payload = np.full(64 << 20, 7, dtype=np.uint8)
    def stall(done):
        print("PARTIAL", done, flush=True)
        time.sleep(120)
    store.write(b"torn", payload, _after_chunk=stall)
    """
)


def test_a_block_torn_mid_write_is_never_served(tmp_path):
    directory = tmp_path / "kv"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        line = _readline_with_timeout(proc, 60)
        assert line.startswith("PARTIAL"), line
        partial = list(directory.glob(".tmp-*.part"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0
        assert not list(directory.glob("*.kvb"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    store = DiskBlockStore(directory, "geom", 64 << 20)
    try:
        assert store.scan() == []
        assert not list(directory.glob(".tmp-*"))  # the torn temporary is gone
        assert not store.path_of(b"torn").exists()
    finally:
        store.close()


def _readline_with_timeout(proc: subprocess.Popen, timeout_s: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout_s):
            raise AssertionError("writer subprocess printed nothing in time")
        return proc.stdout.readline()
    finally:
        sel.close()


def test_a_corrupted_block_file_is_not_served(tmp_path):
    store = DiskBlockStore(tmp_path, "geom", 4096)
    store.write(1, bytes(range(256)) * 16)
    store.write(2, b"\x01" * 4096)
    path = store.path_of(2)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(KVChecksumMismatchError):
        store.read(2)
    assert bytes(store.read(1)) == bytes(range(256)) * 16
    store.close()
    reopened = DiskBlockStore(tmp_path, "geom", 4096)
    assert reopened.scan() == [1]
    assert reopened.num_dropped_on_open == 1
    assert not path.exists()
    reopened.close()
    # another geometry never adopts these files
    other = DiskBlockStore(tmp_path, "other", 4096)
    assert other.scan() == []
    other.close()


def test_block_file_names_round_trip():
    assert block_file_name(b"\x01\xff") == "b01ff.kvb"
    assert block_file_name(-5) == "i-5.kvb"


def test_write_through_keeps_a_copy_below_as_soon_as_cached():
    m = make_manager(gpu=4, cpu=8, write_policy="write_through")
    a = run_request(m, 0)
    assert [m.where(h) for h in a.handle.block_hashes] == [["gpu", "cpu"], ["gpu", "cpu"]]
    run_request(m, 1)
    run_request(m, 2)  # evicts request 0 from the device: the cpu copy is only refreshed
    assert [m.where(h) for h in a.handle.block_hashes] == [["cpu"], ["cpu"]]
    assert m.get_stats()["tiers"]["cpu"]["blocks_in"] == 6
    again = m.allocate(prompt(0))
    again.wait(10)
    assert torch.equal(m.device.read_kv(again.handle), make_kv(0, 2 * BS))
    assert [m.where(h) for h in a.handle.block_hashes] == [["gpu", "cpu"], ["gpu", "cpu"]]
    m.free(again.handle)
    m.close()


def test_admission_after_n_hits_drops_cold_blocks():
    m = make_manager(gpu=4, cpu=8, admit_after_hits=1)
    a = run_request(m, 0)
    run_request(m, 0)  # one hit on request 0's blocks
    b = run_request(m, 1)
    run_request(m, 2)  # evicts request 0 (hit once): admitted below
    run_request(m, 3)  # evicts request 1 (never hit): dropped
    assert [m.where(h) for h in a.handle.block_hashes] == [["cpu"], ["cpu"]]
    assert [m.where(h) for h in b.handle.block_hashes] == [[], []]
    assert m.get_stats()["tiers"]["gpu"]["dropped_blocks"] == 2
    m.close()


def test_budget_error_leaves_every_tier_unchanged():
    m = make_manager(gpu=4, cpu=8)
    run_request(m, 0)
    run_request(m, 1)
    before = m.get_stats()
    cached = {t.name: dict(t.pool.cached) for t in m.tiers}
    with pytest.raises(KVBudgetExceededError):
        m.allocate(prompt(9, num_blocks=5))
    assert m.get_stats() == before
    assert {t.name: dict(t.pool.cached) for t in m.tiers} == cached
    m.close()


def test_config_errors():
    pool = KVPool(num_blocks=4, block_size=BS, model_shape=SHAPE)
    with pytest.raises(KVConfigError):
        KVOffloadManager(pool, [TierConfig("disk", 4, "disk")])  # data pool, no directory
    with pytest.raises(KVConfigError):
        KVOffloadManager(pool, write_policy="write_around")
    with pytest.raises(KVConfigError):
        KVOffloadManager(pool, [TierConfig("cpu", 4), TierConfig("cpu", 4)])
    with pytest.raises(KVConfigError):
        TierConfig("cpu", 0)


@pytest.mark.parametrize("write_policy", ["write_back", "write_through"])
def test_budgets_hold_in_every_tier_under_random_traffic(tmp_path, write_policy):
    rng = random.Random(7)
    m = make_manager(tmp_path, gpu=6, cpu=5, disk=7, write_policy=write_policy)
    live = []
    for _step in range(120):
        if live and (rng.random() < 0.5 or len(live) > 2):
            alloc, i, nb = live.pop(rng.randrange(len(live)))
            m.cache_blocks(alloc.handle)
            m.free(alloc.handle)
        else:
            i, nb = rng.randrange(12), rng.randint(1, 3)
            try:
                alloc = m.allocate(prompt(i, nb))
            except KVBudgetExceededError:
                continue
            alloc.wait(10)
            hit = alloc.handle.num_cached_tokens
            # every hit block reads back exactly what was written for it
            if hit:
                assert torch.equal(
                    m.device.read_kv(alloc.handle, num_tokens=hit), make_kv(i, nb * BS)[:, :, :hit]
                )
            if hit < nb * BS:
                m.device.write_kv(alloc.handle, make_kv(i, nb * BS)[:, :, hit:], start_token=hit)
            live.append((alloc, i, nb))
        m.wait_all()
        for t in m.tiers:
            assert t.pool.num_cached <= t.num_blocks
        assert m.device.block_pool.num_used + m.device.block_pool.num_evictable <= 6
        assert len(list((tmp_path / "kv").glob("*.kvb"))) <= 7
    tiers = m.get_stats()["tiers"]
    assert tiers["cpu"]["hit_blocks"] > 0 and tiers["disk"]["hit_blocks"] > 0  # paths exercised
    m.check_invariants()
    m.close()


def test_a_held_block_stays_in_its_tier_while_spills_evict_others():
    m = KVOffloadManager.from_capacities({"gpu": 2, "cpu": 3}, block_size=BS)
    cpu = m.tier("cpu")

    def run(*hashes):
        a = m.allocate(block_hashes=list(hashes), num_tokens=len(hashes) * BS)
        a.wait(10)
        m.cache_blocks(a.handle)
        m.free(a.handle)

    # the device evicts a request's blocks tail first: b, a, then d, c spill in that order
    run("a", "b")
    run("c", "d")
    run("e", "f")  # cpu (3 blocks) full with a, d, c; b, the oldest, dropped
    assert [h for h in "abcd" if h in cpu] == ["a", "c", "d"]
    m.hold(["a", "zz"])  # zz: in no tier, ignored
    assert cpu.num_held == 1
    run("g", "h")  # f, e spill: the two oldest not held (d, c) make room, a stays
    assert [h for h in "acdef" if h in cpu] == ["a", "e", "f"]
    m.release_holds()
    assert cpu.num_held == 0
    m.check_invariants()
    run("j", "k")  # h, g spill; a (released as just used) outlives f and e
    assert [h for h in "aefgh" if h in cpu] == ["a", "g", "h"]
