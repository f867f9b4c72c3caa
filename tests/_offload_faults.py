"""Disk faults and the disk-side checks shared by the offload state machines
(``test_hardening_offload.py``: one policy, many faults; ``test_system_stateful.py``:
every policy). A machine passed here has ``m`` (a ``KVOffloadManager`` whose last
tier is on disk), ``store`` (that tier's ``DiskBlockStore``), ``io`` (its
``FaultyDiskIO``) and ``deleted`` (hashes whose files were deleted behind the
store's back and not yet noticed)."""

from __future__ import annotations

import errno

from hypothesis import strategies as st

from sagellm_kv_cache.offload import DiskBlockStore
from sagellm_kv_cache.offload.faults import FaultyDiskIO, corrupt_block_file, delete_block_file


def store_with_two_blocks(tmp_path) -> tuple[DiskBlockStore, FaultyDiskIO]:
    """A 4096-byte-block store behind a ``FaultyDiskIO`` holding blocks 1 and 2
    (every byte ``0x01`` and ``0x02``)."""
    io = FaultyDiskIO()
    store = DiskBlockStore(tmp_path / "kv", "geom", 4096, io=io)
    store.write(1, b"\x01" * 4096)
    store.write(2, b"\x02" * 4096)
    return store, io


FAULTS = st.sampled_from(["corrupt", "delete", "disk_full", "disk_ok", "read_fails"])


def inject_fault(machine, fault: str, data) -> None:
    """Apply one fault: a full disk (or healed), a failed next read, or a stored
    block's file corrupted or deleted (drawn from those the disk tier indexes)."""
    if fault == "disk_full":
        machine.io.fail_writes(errno.ENOSPC)
    elif fault == "disk_ok":
        machine.io.heal()
    elif fault == "read_fails":  # the next copy out of the disk tier fails
        machine.io.fail_reads(errno.EIO, count=1)
    else:
        machine.m.wait_all(10)
        keys = set(machine.store.keys()) & set(machine.m.tiers[-1].pool.cached)
        keys = sorted(keys, key=repr)
        if not keys:
            return
        key = data.draw(st.sampled_from(keys))
        if fault == "corrupt":
            corrupt_block_file(machine.store, key)
        else:
            assert delete_block_file(machine.store, key)
            machine.deleted.add(key)


def check_tiers_and_files(machine) -> None:
    """Settle the manager's jobs, then: no orphan files, index entries without
    files only for deletions nothing has read yet, every tier's invariants (the
    manager's own, files == index included, once no such deletion is pending),
    no temporary files left."""
    m = machine.m
    m.wait_all(10)
    m.where(b"")  # settles finished jobs
    index = set(m.tiers[-1].pool.cached)
    files = set(machine.store.keys())
    assert files <= index, f"orphan files {files - index}"
    # only files deleted behind the store's back may be missing (until a read notices)
    assert index - files <= machine.deleted, f"index entries without files {index - files}"
    machine.deleted = index - files
    if machine.deleted:
        m.device.check_invariants()
        for t in m.tiers:
            t.check_invariants()
    else:
        m.check_invariants()  # device, tiers, files == index, exclusive chain
    assert not list(machine.store.directory.glob(".tmp-*"))
