"""The files of the seed's NVMe tier: one whole handle's KV per file (``OffloadSeedMixin``).

::

    file = head | dims | raw bytes
    head, little-endian: magic "SKVH" | version u16 | dtype code u8 | ndim u8
                         | byte count u64 | checksum u64 (blake2b-64 of the bytes)
    dims: ndim x u64

A file is written to a temporary name and renamed over its final one; on
read every header field, the length and the checksum are checked against
what the handle's record expects before any byte is used (nothing is
unpickled).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import KVChecksumMismatchError, KVStorageError

__all__ = ["read_handle_file", "write_handle_file"]

_FILE_MAGIC = b"SKVH"
_FILE_VERSION = 1
_FILE_HEAD = struct.Struct("<4sHBBQQ")  # magic, version, dtype code, ndim, nbytes, checksum
_DIM = struct.Struct("<Q")


def _digest(buf: Any) -> int:
    return int.from_bytes(hashlib.blake2b(buf, digest_size=8).digest(), "little")


def write_handle_file(path: Path, kv: Any, what: str) -> None:
    """Write the KV tensor ``kv`` to ``path`` (``what`` names it in errors).

    Raises:
        KVStorageError: the file cannot be written (no trace is left).
    """
    import torch

    from ..transfer.wire import DTYPE_CODES

    raw = memoryview(kv.contiguous().reshape(-1).view(torch.uint8).numpy())
    name = str(kv.dtype).removeprefix("torch.")
    head = _FILE_HEAD.pack(
        _FILE_MAGIC, _FILE_VERSION, DTYPE_CODES.get(name, 0), kv.dim(), len(raw), _digest(raw)
    )
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head + b"".join(_DIM.pack(d) for d in kv.shape))
            f.write(raw)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KVStorageError(f"cannot write the NVMe copy of {what}: {exc}") from None


def read_handle_file(path: Path, shape: tuple, dtype: Any, nbytes: int, what: str) -> Any:
    """The KV tensor in ``path``, after checking every header field against ``shape`` and
    ``nbytes``, the length and the checksum.

    Raises:
        KVStorageError: unreadable, or a header or length that does not match.
        KVChecksumMismatchError: the bytes do not match their checksum.
    """
    import torch

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KVStorageError(f"NVMe copy of {what} unreadable: {exc}") from None
    where = f"NVMe copy of {what} ({path})"
    ndim = len(shape)
    off = _FILE_HEAD.size + ndim * _DIM.size
    if len(data) < off:
        raise KVStorageError(f"{where}: {len(data)} bytes, shorter than its header")
    magic, version, _code, nd, n, checksum = _FILE_HEAD.unpack_from(data)
    dims = tuple(_DIM.unpack_from(data, _FILE_HEAD.size + i * 8)[0] for i in range(ndim))
    expected = (_FILE_MAGIC, _FILE_VERSION, ndim, tuple(shape), nbytes)
    if (magic, version, nd, dims, n) != expected or len(data) != off + n:
        raise KVStorageError(f"{where}: header or length does not match the handle")
    body = memoryview(data)[off:]
    if _digest(body) != checksum:
        raise KVChecksumMismatchError(f"{where}: checksum mismatch")
    flat = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    return flat.view(dtype).view(shape)
