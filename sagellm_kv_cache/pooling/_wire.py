"""The fetch request and answer of ``RemoteKVAccessor`` on the control store.

A request is a fixed header and the raw block hashes, never pickled::

    magic "SKVP" | version u8 | kind u8 (0 bytes, 1 u64) | hash_len u16 | n u32 | min_blocks u32
    n * hash_len bytes (kind 0) or n * u64 (kind 1)

The answer is ``OK:<num_blocks>`` (that many leading blocks follow as one
transfer; 0: nothing follows), ``ERR:<code>:<message>``, or ``CANCELLED``
(the requester gave up first; claimed with ``compare_set``).
"""

from __future__ import annotations

import struct
from collections.abc import Hashable, Sequence
from typing import cast

from ..errors import KVInvalidInputError, KVTransferFailedError
from ..transfer.protocol import CANCELLED  # the mark ``settle`` claims a verdict with

__all__ = ["CANCELLED", "MAX_HASHES", "decode_answer", "decode_request", "encode_request"]

_MAGIC = b"SKVP"
_VERSION = 1
_HEAD = struct.Struct("<4sBBHII")
#: at most this many hashes per request (a 2**20-block prefix is far beyond any pool)
MAX_HASHES = 1 << 20
_MAX_HASH_LEN = 64


def encode_request(hashes: Sequence[Hashable], min_blocks: int) -> bytes:
    """Raises KVInvalidInputError for hashes that do not travel: mixed kinds,
    bytes of unequal length or over 64 bytes, ints outside [0, 2**64)."""
    n = len(hashes)
    if n > MAX_HASHES:
        raise KVInvalidInputError(f"{n} block hashes in one fetch; at most {MAX_HASHES}")
    if n == 0:
        return _HEAD.pack(_MAGIC, _VERSION, 0, 0, 0, min_blocks)
    first = hashes[0]
    if isinstance(first, bytes):
        hl = len(first)
        if not 0 < hl <= _MAX_HASH_LEN or any(type(h) is not bytes or len(h) != hl for h in hashes):
            raise KVInvalidInputError(
                "remote block hashes must be bytes of one length (1..64) or ints in [0, 2**64)"
            )
        raw = cast("list[bytes]", hashes)  # checked above: bytes of one length
        return _HEAD.pack(_MAGIC, _VERSION, 0, hl, n, min_blocks) + b"".join(raw)
    if all(type(h) is int and 0 <= h < 1 << 64 for h in hashes):
        return _HEAD.pack(_MAGIC, _VERSION, 1, 8, n, min_blocks) + struct.pack(f"<{n}Q", *hashes)
    raise KVInvalidInputError(
        "remote block hashes must be bytes of one length (1..64) or ints in [0, 2**64)"
    )


def decode_request(raw: bytes) -> tuple[list, int]:
    """``(hashes, min_blocks)``; KVTransferFailedError for anything malformed."""
    raw = bytes(raw)
    if len(raw) < _HEAD.size:
        raise KVTransferFailedError(f"fetch request of {len(raw)} bytes is shorter than its header")
    magic, version, kind, hl, n, min_blocks = _HEAD.unpack_from(raw)
    if magic != _MAGIC or version != _VERSION or kind not in (0, 1):
        raise KVTransferFailedError("not a fetch request (magic, version or kind)")
    if n > MAX_HASHES or (not 0 < hl <= _MAX_HASH_LEN and n) or (kind == 1 and hl != 8):
        raise KVTransferFailedError(f"fetch request of {n} hashes of {hl} bytes")
    body = raw[_HEAD.size :]
    if len(body) != n * hl:
        raise KVTransferFailedError(f"fetch request body of {len(body)} bytes, expected {n * hl}")
    if kind == 1:
        return list(struct.unpack(f"<{n}Q", body)), min_blocks
    return [body[i * hl : (i + 1) * hl] for i in range(n)], min_blocks


def decode_answer(raw: bytes) -> tuple[str, int, str]:
    """``(code, num_blocks, message)``; code ``"OK"`` or the remote error code."""
    text = bytes(raw)[:1024].decode("utf-8", "replace")
    if text.startswith("OK:"):
        digits = text[3:]
        if digits.isdigit() and len(digits) <= 8:
            return "OK", int(digits), ""
    elif text.startswith("ERR:"):
        code, _, msg = text[4:].partition(":")
        return code or KVTransferFailedError.code, 0, msg
    raise KVTransferFailedError(f"malformed fetch answer {text[:60]!r}")
