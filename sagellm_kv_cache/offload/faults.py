"""Fault injection for the disk tier: tests and chaos runs, no monkeypatching.

Every byte a ``DiskBlockStore`` moves goes through its ``io`` object; a
``FaultyDiskIO`` fails or stalls those calls on demand. The helpers below
damage the file of one stored block by its hash::

    store = manager.tiers[-1].disk       # the DiskBlockStore of a disk tier
    io = FaultyDiskIO()
    store.io = io                        # (or DiskBlockStore(..., io=io))
    io.fail_writes(errno.ENOSPC)         # every write fails: the disk is full
    io.fail_reads(errno.EIO, count=1)    # the next payload read fails
    io.heal()                            # back to normal
    corrupt_block_file(store, key)       # one payload byte flipped: crc mismatch on read
    delete_block_file(store, key)        # the file vanishes: a miss on read

What the manager does with each (see ``manager.py``): a block that cannot be
read is a miss (the request recomputes it) and is dropped from the tier; a
block that cannot be written is not stored (``TierStats.write_errors``).
"""

from __future__ import annotations

import errno as errno_
import os
import threading
from collections.abc import Hashable
from pathlib import Path

from .disk import DiskBlockStore, DiskIO

__all__ = ["FaultyDiskIO", "corrupt_block_file", "delete_block_file"]


class FaultyDiskIO(DiskIO):
    """A ``DiskIO`` that fails writes and reads on demand, or holds reads.

    Attributes:
        num_failed_writes / num_failed_reads: faults injected so far.
        read_gate: when set to an unset ``threading.Event``, every payload read
            waits for it (at most ``gate_timeout_s``): a test holds the copy
            worker mid-job to act while an onboarding is in flight.
    """

    def __init__(self, gate_timeout_s: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._write_errno: int | None = None
        self._writes_left: int | None = None
        self._read_errno: int | None = None
        self._reads_left: int | None = None
        self.num_failed_writes = 0
        self.num_failed_reads = 0
        self.read_gate: threading.Event | None = None
        self.gate_timeout_s = gate_timeout_s

    def fail_writes(self, err: int = errno_.ENOSPC, count: int | None = None) -> None:
        """Make the next ``count`` writes (all when ``None``) raise ``OSError(err)``."""
        with self._lock:
            self._write_errno, self._writes_left = err, count

    def fail_reads(self, err: int = errno_.EIO, count: int | None = None) -> None:
        """Make the next ``count`` payload reads (all when ``None``) raise ``OSError(err)``.

        A read is one ``read`` or ``preadv`` call: ``read_into`` reads a block larger
        than a run in several, and the first that fails fails the whole block."""
        with self._lock:
            self._read_errno, self._reads_left = err, count

    def heal(self) -> None:
        """No more injected failures (a held read gate stays as it is)."""
        with self._lock:
            self._write_errno = self._read_errno = None
            self._writes_left = self._reads_left = None

    def _take(self, kind: str) -> int | None:
        with self._lock:
            err = getattr(self, f"_{kind}_errno")
            if err is None:
                return None
            left = getattr(self, f"_{kind}s_left")
            if left is not None:
                left -= 1
                setattr(self, f"_{kind}s_left", left)
                if left <= 0:
                    setattr(self, f"_{kind}_errno", None)
            setattr(self, f"num_failed_{kind}s", getattr(self, f"num_failed_{kind}s") + 1)
            return err

    def write(self, fd: int, data: memoryview) -> int:
        err = self._take("write")
        if err is not None:
            raise OSError(err, os.strerror(err))
        return super().write(fd, data)

    def _before_read(self) -> None:
        gate = self.read_gate
        if gate is not None and not gate.wait(self.gate_timeout_s):
            raise OSError(errno_.ETIMEDOUT, "read gate was never opened")
        err = self._take("read")
        if err is not None:
            raise OSError(err, os.strerror(err))

    def read(self, path: Path, offset: int, nbytes: int):
        self._before_read()
        return super().read(path, offset, nbytes)

    def preadv(self, fd: int, buffers: list, offset: int) -> int:
        self._before_read()
        return super().preadv(fd, buffers, offset)


def corrupt_block_file(store: DiskBlockStore, key: Hashable) -> Path:
    """Flip the last payload byte of block ``key``'s file; its path.

    Raises:
        FileNotFoundError: the store holds no file for ``key``.
    """
    path = store.path_of(key)
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path


def delete_block_file(store: DiskBlockStore, key: Hashable) -> bool:
    """Remove block ``key``'s file behind the store's back; whether it existed."""
    try:
        os.unlink(store.path_of(key))
    except FileNotFoundError:
        return False
    return True
