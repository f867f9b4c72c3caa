"""Payload compression of KV transfers: ``zstd`` (level 1, the ``[zstd]`` extra) or ``zlib``.

Measured on bf16 KV (``benchmarks/bench_transfer.py --codecs``): zstd level 1
compresses ~25x faster than zlib level 1 for a slightly better ratio (both
~0.78-0.80 of the raw bytes: bf16 KV is nearly incompressible). Even zstd
runs below a loopback link, so compression stays off by default; it pays only
on a link slower than ~1 GB/s. ``zlib`` stays readable for old senders.

Decompression is bounded: a chunk inflates to at most its declared size plus
one byte; more, less or undecodable is refused (``field="compression"``)
without ever holding more than that.
"""

from __future__ import annotations

import zlib
from typing import Any

from ..errors import KVConfigError, KVTransferFailedError

__all__ = ["CODECS", "compress", "decompress", "require_codec"]

#: names a caller may pass as ``compression=`` (``None`` means "none")
CODECS = ("none", "zlib", "zstd")


def require_codec(name: str) -> None:
    """Raise a typed error naming the extra when ``name``'s package is missing."""
    if name not in CODECS:
        raise KVConfigError(
            f"compression must be None, 'zstd' or 'zlib', got {name!r}", field="compression"
        )
    if name == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise KVConfigError(
                "compression='zstd' needs the zstandard package: "
                "pip install 'sagellm-kv-cache[zstd]'",
                field="compression",
            ) from None


def compress(name: str, raw: bytes) -> bytes:
    """One chunk's wire bytes (level 1: the fast end of both codecs)."""
    if name == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=1).compress(raw)
    return zlib.compress(raw, 1)


def decompress(name: str, data: Any, expected: int, chunk: int) -> bytes:
    """Chunk ``chunk`` inflated to exactly ``expected`` bytes, never more than
    ``expected + 1`` held."""
    if name == "zstd":
        raw, complete, err = _unzstd(data, expected)
    else:
        raw, complete, err = _unzlib(data, expected)
    if err is not None:
        raise KVTransferFailedError(
            f"chunk {chunk} does not decompress: {err}", field="compression"
        )
    if len(raw) > expected:
        raise KVTransferFailedError(
            f"chunk {chunk} inflates past its declared {expected} bytes", field="compression"
        )
    if len(raw) != expected or not complete:
        raise KVTransferFailedError(
            f"chunk {chunk} is not one {name} stream of {expected} bytes "
            f"({len(raw)} bytes, {'complete' if complete else 'truncated'})",
            field="compression",
        )
    return raw


def _unzlib(data: Any, expected: int) -> tuple[bytes, bool, str | None]:
    d = zlib.decompressobj()
    try:
        raw = d.decompress(data, expected + 1)
    except zlib.error as exc:
        return b"", False, str(exc)
    return raw, d.eof and not d.unused_data, None


def _unzstd(data: Any, expected: int) -> tuple[bytes, bool, str | None]:
    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(bytes(data)) as r:
            raw = r.read(expected + 1)
            complete = len(raw) <= expected and r.read(1) == b""
    except zstandard.ZstdError as exc:
        return b"", False, str(exc)
    return raw, complete, None
