"""The byte plumbing under ``DiskBlockStore`` (``disk.py``): the I/O seam, checksums,
and how a block's destination buffers are cut into read runs.

* ``DiskIO``: every call that moves bytes (write, fsync, rename, read, ``preadv``); a
  subclass injects faults (``faults.py``).
* ``hasher`` / ``checksum``: crc32 (kind 0) or xxh3_64 (kind 1, with ``xxhash``) over
  buffers, streamed, no copy.
* ``read_runs``: the destination buffers of one block as runs of at most N bytes, each
  read by one ``preadv`` and hashed while it is still in the core's cache.
"""

from __future__ import annotations

import contextlib
import functools
import os
import zlib
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from ..errors import KVInvalidInputError, KVInvalidTypeError, KVStorageError

__all__ = ["CRC32", "XXH3", "XXH3_64", "DiskIO", "checksum", "hasher", "read_runs"]

CRC32, XXH3_64 = 0, 1


def _load_xxh3() -> Any:
    try:
        import xxhash
    except ImportError:  # pragma: no cover - the [fast] extra is missing
        return None
    return xxhash.xxh3_64


XXH3 = _load_xxh3()


class _Crc32:
    """``zlib.crc32`` behind the streaming interface of ``xxhash.xxh3_64``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def intdigest(self) -> int:
        return self.value


def hasher(kind: int) -> Any:
    """A fresh streaming hasher of checksum ``kind`` (None: unknown, or xxhash missing)."""
    if kind == CRC32:
        return _Crc32()
    if kind == XXH3_64 and XXH3 is not None:
        return XXH3()
    return None


def checksum(kind: int, chunks: Any) -> int | None:
    h = hasher(kind)
    if h is None:
        return None
    for c in chunks:
        h.update(c)
    return int(h.intdigest())


class DiskIO:
    """The byte-moving calls of a ``DiskBlockStore``: the seam for fault injection.

    A subclass overrides any of them to fail (raise an ``OSError``) or stall;
    the store turns what they raise into typed errors and cleans up.
    """

    def write(self, fd: int, data: memoryview) -> int:
        """Write some of ``data`` to ``fd``; bytes written (``os.write``)."""
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def replace(self, src: Path, dst: Path) -> None:
        """Atomically rename a finished temporary over the block's file."""
        os.replace(src, dst)

    def read(self, path: Path, offset: int, nbytes: int):
        """The payload bytes as a copy-on-write ``numpy.memmap`` of uint8."""
        import numpy as np

        return np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))

    def preadv(self, fd: int, buffers: list, offset: int) -> int:
        """Read into ``buffers`` in order from ``offset`` of ``fd``; bytes read (``os.preadv``)."""
        return os.preadv(fd, buffers, offset)


def storage_error(what: str, exc: OSError, key: Hashable | None = None) -> KVStorageError:
    err = KVStorageError(f"{what}: {exc.strerror or exc}", errno=exc.errno, key=str(key))
    err.errno = exc.errno  # OSError's field: callers can test errno.ENOSPC directly
    err.__cause__ = exc
    return err


def as_bytes_view(payload: Any) -> memoryview:
    mod = type(payload).__module__
    if mod.startswith("torch"):
        t = payload.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        payload = t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy()
    try:
        view = memoryview(payload)
    except TypeError:
        raise KVInvalidTypeError(
            f"block payload must be bytes, an array or a tensor, got {type(payload).__name__}"
        ) from None
    if not view.contiguous:
        raise KVInvalidInputError("block payload must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def read_runs(buffers: list, run_bytes: int) -> tuple[list[list[memoryview]], list[int]]:
    """``buffers`` (writable, contiguous) as consecutive runs of at most ``run_bytes``
    and the byte size of each run; one empty run for none.

    Buffers no longer than a run are grouped whole; the grouping depends only on their
    sizes, so it is computed once per list of sizes (every block of a storage has the
    same pieces) and then only sliced out. Longer buffers are cut at run boundaries."""
    mvs: list[memoryview] = [b if type(b) is memoryview else memoryview(b) for b in buffers]
    sizes = tuple([m.nbytes for m in mvs])
    if sizes and max(sizes) > run_bytes:
        return _cut_runs(mvs, run_bytes)
    bounds, totals = _grouping(sizes, run_bytes)
    return [mvs[i:j] for i, j in bounds], list(totals)


def _cut_runs(mvs: list[memoryview], run_bytes: int) -> tuple[list[list[memoryview]], list[int]]:
    """The bytes of ``mvs`` in runs of exactly ``run_bytes`` (the last one shorter)."""
    runs: list[list[memoryview]] = [[]]
    sizes = [0]
    for m in mvs:
        if m.format != "B" or m.ndim != 1:
            m = m.cast("B")
        pos, end = 0, m.nbytes
        while pos < end:
            if sizes[-1] == run_bytes:
                runs.append([])
                sizes.append(0)
            take = min(run_bytes - sizes[-1], end - pos)
            runs[-1].append(m[pos : pos + take])
            sizes[-1] += take
            pos += take
    return runs, sizes


@functools.lru_cache(maxsize=16)
def _grouping(
    sizes: tuple[int, ...], run_bytes: int
) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """(start, stop) of each run of consecutive ``sizes`` (each at most ``run_bytes``)
    adding up to at most ``run_bytes``, and each run's total."""
    bounds: list[tuple[int, int]] = []
    totals: list[int] = []
    start, total = 0, 0
    for i, n in enumerate(sizes):
        if total + n > run_bytes and i > start:
            bounds.append((start, i))
            totals.append(total)
            start, total = i, 0
        total += n
    bounds.append((start, len(sizes)))
    totals.append(total)
    return tuple(bounds), tuple(totals)


def write_all(io: DiskIO, fd: int, data: memoryview) -> None:
    while data.nbytes:
        n = io.write(fd, data)
        data = data[n:]


def unlink_quietly(path: str | os.PathLike) -> None:
    """Best-effort removal (cleanup after a failure must not mask that failure)."""
    with contextlib.suppress(OSError):
        os.unlink(path)
