"""Crash-safe block files: the byte store under the disk tier.

One file per block, named after the block hash, in one directory::

    <dir>                        flock'ed (the directory itself) by the one store that owns it
    <dir>/b3fa9...e1.kvb         a visible block (bytes hash: "b" + hex)
    <dir>/i-1234.kvb             a visible block (integer hash, e.g. a Mooncake id: "i" + int)
    <dir>/.tmp-....part          a write in progress (or torn by a crash): never served

    file = header (64 B) | key bytes | zero padding to 64 B | payload
    header, little-endian:
        magic  "SKVB" | version u16 | key kind u8 (0 bytes, 1 int) | checksum kind u8
        key length u32 | payload length u64 | checksum low u32 | checksum high u32
        geometry digest (16 B: blake2b of dtype and block shape) | 20 B zero
    checksum kind 0: crc32 of the payload (high word 0); 1: xxh3_64 of the payload
    (written when ``xxhash`` is installed: ten times the speed of crc32 here)

Visibility is all or nothing: a block is written to a temporary name,
``fsync``'ed, renamed over its final name with ``os.replace`` (atomic on
POSIX) and the directory is ``fsync``'ed. A writer killed at any point leaves
either no final file or a complete one; temporaries are deleted when the
store is (re)opened. Reads check the payload's checksum (and on open the header, the size and,
by default, the checksum), so a block whose bytes do not match what was
written is never served. ``read_into`` reads a block straight into caller
buffers (the destination KV block's chunks), no intermediate copy: one ``preadv``
per run of 256 KiB (the header and key with the first), each run hashed in place
as soon as it lands, while it is still in the core's cache (``diskio.read_runs``).

Failures are typed and leave no trace: every OS error becomes a
``KVStorageError`` (``__cause__`` the ``OSError``; a missing file, a full disk,
an I/O error), a payload that does not match its checksum a
``KVChecksumMismatchError``; a failed write leaves neither a temporary nor a
final file. The directory lock is ``flock`` on the directory itself, held for
the store's life: no file inside it can be deleted to let a second store in
(``KVStorageLockedError``).

Fault injection: every byte the store moves goes through ``store.io`` (a
``DiskIO``, ``diskio.py``; pass ``io=`` or assign it). ``offload/faults.py`` has a
``FaultyDiskIO`` (disk full, read errors) and helpers that corrupt or delete
the file of a stored block (``path_of(key)`` names it).

Nothing here is unpickled: the header is a fixed ``struct`` and the payload
raw tensor bytes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import uuid
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

from ..errors import (
    KVChecksumMismatchError,
    KVConfigError,
    KVInvalidInputError,
    KVStorageError,
    KVStorageLockedError,
)
from . import diskio
from .diskio import (
    CRC32,
    XXH3_64,
    DiskIO,
    as_bytes_view,
    checksum,
    hasher,
    read_runs,
    storage_error,
    unlink_quietly,
    write_all,
)

__all__ = ["DiskBlockStore", "DiskIO", "block_file_name", "parse_block_file_name"]

_MAGIC = b"SKVB"
_VERSION = 1
_HEADER = struct.Struct("<4sHBBIQII16s20s")  # 64 bytes
assert _HEADER.size == 64
_ALIGN = 64
_SUFFIX = ".kvb"
_TMP_PREFIX = ".tmp-"
_CHUNK_BYTES = 8 << 20
# read_into reads and hashes runs of this many bytes: a run is hashed while it is still in
# the core's cache (hashing a whole 2 MiB block after its read costs twice as much here)
_RUN_BYTES = 256 << 10
_XXH3 = diskio.XXH3  # None: blocks are written with crc32 (tests switch it off here)


def block_file_name(key: Hashable) -> str:
    """File name of the block with hash ``key`` (bytes or int)."""
    if isinstance(key, bytes):
        return f"b{key.hex()}{_SUFFIX}"
    if isinstance(key, int) and not isinstance(key, bool):
        return f"i{key}{_SUFFIX}"
    raise KVInvalidInputError(f"disk tier keys must be bytes or int, got {type(key).__name__}")


def parse_block_file_name(name: str) -> Hashable | None:
    """Inverse of ``block_file_name``; ``None`` for any other name."""
    if not name.endswith(_SUFFIX) or len(name) < len(_SUFFIX) + 2:
        return None
    body = name[1 : -len(_SUFFIX)]
    try:
        if name[0] == "b":
            return bytes.fromhex(body)
        if name[0] == "i":
            return int(body)
    except ValueError:
        return None
    return None


def _malformed(name: str, key: Hashable) -> KVChecksumMismatchError:
    return KVChecksumMismatchError(f"block file {name} is malformed", key=str(key))


def _mismatch(name: str, key: Hashable) -> KVChecksumMismatchError:
    return KVChecksumMismatchError(
        f"block file {name}: payload checksum does not match its header", key=str(key)
    )


def _key_bytes(key: Hashable) -> tuple[int, bytes]:
    if isinstance(key, bytes):
        return 0, key
    return 1, str(key).encode()


def _payload_offset(key_len: int) -> int:
    return -(-(_HEADER.size + key_len) // _ALIGN) * _ALIGN


class DiskBlockStore:
    """Block files in one directory, owned by one store at a time.

    Args:
        directory: where the files live (created if missing).
        geometry: a string naming dtype and block shape; files written with
            another geometry are ignored (and removed) on open.
        block_nbytes: payload size of one block.
        fsync: sync file and directory before a block becomes visible
            (turn off only for throwaway benchmarks).
        verify_on_open: check every file's crc32 when opening (else only its
            header and size; the checksum is always checked on read).
        io: the byte-moving calls (``DiskIO``; a subclass injects faults).

    Raises:
        KVConfigError: ``block_nbytes`` is not a positive int.
        KVStorageLockedError: another live store (this process or another)
            holds the directory.
        KVStorageError: the directory cannot be created or opened.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        geometry: str,
        block_nbytes: int,
        *,
        fsync: bool = True,
        verify_on_open: bool = True,
        io: DiskIO | None = None,
    ) -> None:
        if isinstance(block_nbytes, bool) or not isinstance(block_nbytes, int):
            raise KVConfigError(f"block_nbytes must be an int, got {type(block_nbytes).__name__}")
        if block_nbytes < 1:
            raise KVConfigError(f"block_nbytes must be >= 1, got {block_nbytes}")
        self.directory = Path(directory)
        self._dir = str(self.directory)
        self.geometry = geometry
        self._geometry_digest = hashlib.blake2b(geometry.encode(), digest_size=16).digest()
        self.block_nbytes = block_nbytes
        self.fsync = fsync
        self.verify_on_open = verify_on_open
        self.io = io if io is not None else DiskIO()
        self._read_flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)
        self._lock_fd = -1
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # the lock is on the directory's inode: no name inside it can be
            # unlinked or replaced to let a second store in
            self._lock_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise storage_error(f"cannot open disk tier directory {self.directory}", exc) from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = -1
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise KVStorageLockedError(
                    f"disk tier directory {self.directory} is in use by another store"
                ) from exc
            raise storage_error(f"cannot lock {self.directory}", exc) from exc
        self.num_dropped_on_open = 0

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> DiskBlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path_of(self, key: Hashable) -> Path:
        """The file that holds block ``key`` (whether or not it exists)."""
        return self.directory / block_file_name(key)

    def scan(self) -> list[Hashable]:
        """Keys of the valid blocks on disk, oldest (by mtime) first.

        Removes temporaries of torn writes and files that fail validation
        (unreadable ones included).
        """
        found: list[tuple[int, str, Hashable]] = []
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            raise storage_error(f"cannot list {self.directory}", exc) from exc
        for entry in entries:
            name = entry.name
            if name.startswith(_TMP_PREFIX):
                unlink_quietly(entry.path)  # a write that never completed
                continue
            key = parse_block_file_name(name)
            if key is None:
                continue
            try:
                ok = self._valid(entry.path, key, check_payload=self.verify_on_open)
                mtime = entry.stat().st_mtime_ns if ok else 0
            except OSError:
                ok = False
            if ok:
                found.append((mtime, name, key))
            else:
                unlink_quietly(entry.path)
                self.num_dropped_on_open += 1
        found.sort(key=lambda t: (t[0], t[1]))
        return [k for _, _, k in found]

    def _parse_header(self, raw: bytes | bytearray, key: Hashable) -> tuple[int, int, int] | None:
        """(payload offset, checksum kind, checksum) when ``raw`` (header and key bytes)
        matches ``key`` and this geometry."""
        if len(raw) < _HEADER.size:
            return None
        magic, version, kind, algo, key_len, payload_len, lo, hi, geom, _ = _HEADER.unpack_from(raw)
        want_kind, want_key = _key_bytes(key)
        if (
            magic != _MAGIC
            or version != _VERSION
            or kind != want_kind
            or key_len != len(want_key)
            or payload_len != self.block_nbytes
            or geom != self._geometry_digest
            or raw[_HEADER.size : _HEADER.size + key_len] != want_key
        ):
            return None
        return _payload_offset(key_len), algo, lo | (hi << 32)

    def _read_header(self, fd: int, key: Hashable) -> tuple[int, int, int] | None:
        raw = os.pread(fd, _payload_offset(len(_key_bytes(key)[1])), 0)
        return self._parse_header(raw, key)

    def _valid(self, path: str, key: Hashable, *, check_payload: bool) -> bool:
        fd = os.open(path, os.O_RDONLY)
        try:
            head = self._read_header(fd, key)
            if head is None:
                return False
            off, algo, digest = head
            if os.fstat(fd).st_size != off + self.block_nbytes:
                return False
            if check_payload:
                h = hasher(algo)
                if h is None:
                    return False
                pos = off
                end = off + self.block_nbytes
                while pos < end:
                    chunk = os.pread(fd, min(_CHUNK_BYTES, end - pos), pos)
                    if not chunk:
                        return False
                    h.update(chunk)
                    pos += len(chunk)
                return int(h.intdigest()) == digest
            return True
        finally:
            os.close(fd)

    # -- write ---------------------------------------------------------------
    def write(
        self,
        key: Hashable,
        payload: Any,
        *,
        _after_chunk: Callable[[int], None] | None = None,
    ) -> None:
        """Write one block atomically (visible only once complete and synced).

        Args:
            key: block hash (bytes or int).
            payload: ``block_nbytes`` bytes (bytes, memoryview, numpy array, or
                a contiguous CPU tensor).
            _after_chunk: test hook called with the bytes written so far after
                every chunk (crash tests kill the writer from there).

        Raises:
            KVInvalidInputError: wrong payload size or key type (nothing written).
            KVStorageError: the write failed (disk full: ``errno`` ENOSPC or
                EFBIG; I/O error); neither a temporary nor the block's file is
                left behind (an older file of ``key`` is gone too).
        """
        view = as_bytes_view(payload)
        if view.nbytes != self.block_nbytes:
            raise KVInvalidInputError(
                f"block payload has {view.nbytes} bytes, the store expects {self.block_nbytes}"
            )
        final = self.path_of(key)
        kind, kb = _key_bytes(key)
        algo = XXH3_64 if _XXH3 is not None else CRC32
        digest = checksum(algo, (view,))
        assert digest is not None
        header = _HEADER.pack(
            _MAGIC,
            _VERSION,
            kind,
            algo,
            len(kb),
            view.nbytes,
            digest & 0xFFFFFFFF,
            digest >> 32,
            self._geometry_digest,
            b"",
        )
        prefix = header + kb
        prefix += b"\0" * (_payload_offset(len(kb)) - len(prefix))
        tmp = self.directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}.part"
        io = self.io
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise storage_error(
                f"cannot create a block file in {self.directory}", exc, key
            ) from exc
        try:
            write_all(io, fd, memoryview(prefix))
            done = 0
            for pos in range(0, view.nbytes, _CHUNK_BYTES):
                write_all(io, fd, view[pos : pos + _CHUNK_BYTES])
                done = min(view.nbytes, pos + _CHUNK_BYTES)
                if _after_chunk is not None:
                    _after_chunk(done)
            if self.fsync:
                io.fsync(fd)
            os.close(fd)
            fd = -1
            io.replace(tmp, final)
            if self.fsync:
                dfd = os.open(self.directory, os.O_RDONLY)
                try:
                    io.fsync(dfd)
                finally:
                    os.close(dfd)
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            unlink_quietly(tmp)
            # a block whose write did not complete is not stored: not even an
            # older copy of it stays (the caller drops it from its index)
            unlink_quietly(final)
            if isinstance(exc, OSError) and not isinstance(exc, KVStorageError):
                raise storage_error(f"cannot write block file {final.name}", exc, key) from exc
            raise

    # -- read ----------------------------------------------------------------
    def read(self, key: Hashable, *, verify: bool = True):
        """The payload of ``key`` as a writable (copy-on-write) ``numpy.memmap`` of uint8.

        Raises:
            KVStorageError: no such file (``__cause__`` a ``FileNotFoundError``)
                or it cannot be read.
            KVChecksumMismatchError: a malformed file, or bytes that do not
                match the header's checksum.
        """
        path = self.path_of(key)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                head = self._read_header(fd, key)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if head is None or size != head[0] + self.block_nbytes:
                raise _malformed(path.name, key)
            off, algo, digest = head
            mm = self.io.read(path, off, self.block_nbytes)
        except KVChecksumMismatchError:
            raise
        except OSError as exc:
            raise storage_error(f"cannot read block file {path.name}", exc, key) from exc
        if verify:
            self._verify(path, key, algo, digest, (mm,))
        return mm

    def read_into(self, key: Hashable, buffers: list) -> None:
        """Read the payload of ``key`` into ``buffers`` (writable, ``block_nbytes`` in all,
        filled in order) and check it in place: open, then ``preadv`` runs of at most
        ``_RUN_BYTES`` (the first with the header and key, the last with one byte more to
        catch a file longer than its header says), each hashed straight after it lands,
        while it is still in the core's cache; close. No intermediate copy.

        On an error the buffers may hold part of the bytes: the caller must not
        use them (the onboarding leaves such a block unverified).

        Raises:
            KVStorageError / KVChecksumMismatchError: as ``read`` (buffers that do not
                add up to ``block_nbytes`` read as a malformed file).
        """
        name = block_file_name(key)
        path = os.path.join(self._dir, name)  # no pathlib on the hot path
        head_len = _payload_offset(len(_key_bytes(key)[1]))
        head = bytearray(head_len)
        tail = bytearray(1)  # a file longer than its header says fills it
        runs, sizes = read_runs(buffers, _RUN_BYTES)
        last = len(runs) - 1
        preadv = self.io.preadv
        try:
            fd = self._open_read(path)
            try:
                n = preadv(fd, [head, *runs[0], tail] if last == 0 else [head, *runs[0]], 0)
                parsed = self._parse_header(head, key)
                pos = head_len + sizes[0]
                if (
                    parsed is None
                    or parsed[0] != head_len
                    or sum(sizes) != self.block_nbytes
                    or n != pos
                ):
                    raise _malformed(name, key)
                h = hasher(parsed[1])
                if h is None:  # a checksum kind this reader cannot compute
                    raise _mismatch(name, key)
                update = h.update
                for i, run in enumerate(runs):
                    if i:
                        n = preadv(fd, [*run, tail] if i == last else run, pos)
                        if n != sizes[i]:
                            raise _malformed(name, key)
                        pos += n
                    for b in run:
                        update(b)
            finally:
                os.close(fd)
        except OSError as exc:
            raise storage_error(f"cannot read block file {name}", exc, key) from exc
        if h.intdigest() != parsed[2]:
            raise _mismatch(name, key)

    def _open_read(self, path: str) -> int:
        """``os.open`` for reading, without an access-time update where allowed: a block
        file read right after it was written would otherwise dirty its inode (relatime)."""
        try:
            return os.open(path, self._read_flags)
        except PermissionError:
            if self._read_flags == os.O_RDONLY:
                raise
            self._read_flags = os.O_RDONLY  # O_NOATIME needs the file's owner: not us
            return os.open(path, os.O_RDONLY)

    @staticmethod
    def _verify(path: str | Path, key: Hashable, algo: int, digest: int, chunks: Any) -> None:
        if checksum(algo, chunks) != digest:
            raise _mismatch(os.path.basename(path), key)

    def delete(self, key: Hashable) -> None:
        """Remove block ``key``'s file (a missing file is fine).

        Raises:
            KVStorageError: the file exists and cannot be removed.
        """
        path = self.path_of(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(f"cannot delete block file {path.name}", exc, key) from exc

    def keys(self) -> Iterator[Hashable]:
        """Keys of the visible block files (no validation)."""
        try:
            names = [e.name for e in os.scandir(self.directory)]
        except OSError as exc:
            raise storage_error(f"cannot list {self.directory}", exc) from exc
        for name in names:
            key = parse_block_file_name(name)
            if key is not None:
                yield key

    def __repr__(self) -> str:
        return f"DiskBlockStore({str(self.directory)!r}, block_nbytes={self.block_nbytes})"
