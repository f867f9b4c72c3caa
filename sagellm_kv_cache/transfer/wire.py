"""Wire format of a KV transfer: a fixed, validated header and trailer, never pickle.

One transfer moves the blocks of one or more handles ("segments") from a
sender's pool to a receiver's pool::

    control plane (c10d store / in-process)        data plane (gloo, NCCL, NIXL)
    -------------------------------------------    ------------------------------
    header  : HEADER_STRUCT + segments + hashes    chunk 0 : blocks [0, k)
    ready   : b"OK" | error code   (receiver)      chunk 1 : blocks [k, 2k)
    trailer : TRAILER_STRUCT (checksum)            ...
    ack     : b"OK" | error code   (receiver)

Header (little-endian, ``HEADER_STRUCT``)::

    magic b"SKVX" | version u16 | flags u16 | transfer_id u64 | src_rank u32 |
    dst_rank u32 | num_segments u32 | num_blocks u32 | num_tokens u64 |
    block_size u32 | dtype u8 | layout u8 | checksum_algo u8 | compression u8 |
    num_layers u32 | num_kv_heads u32 | head_dim u32 | payload_nbytes u64 |
    num_chunks u32 | blocks_per_chunk u32 | hash_kind u8 | hash_len u8 |
    num_hashes u32

followed by ``num_segments`` x ``SEGMENT_STRUCT`` (num_tokens u64, num_blocks
u32, num_hashes u32), ``num_chunks`` x u64 wire sizes of the chunks,
``num_hashes`` block hashes of ``hash_len`` bytes each (``hash_kind`` 1:
bytes, 2: signed int64 for integer hashes from traces) and, when ``flags``
bit 0 is set, ``num_blocks`` x u32 source block ids.

Payload chunk ``c`` holds blocks ``[c*k, min((c+1)*k, num_blocks))`` as the
pool stores them, ``[num_layers, 2, n, <block dims>]`` (C order), optionally
compressed. The checksum covers the *wire* bytes message by message (chunks,
or direct-mode slabs): the digest of the per-message digests in order
(``Checksum``). It travels in the trailer so the sender can hash while the
data is in flight::

    magic b"SKVT" | version u16 | checksum_algo u8 | pad u8 | transfer_id u64 |
    num_chunks u32 | checksum u64

Every field is checked on receipt (``decode_header``); a bad magic, version,
dtype, size or count raises ``KVTransferFailedError`` with code
``KV_TRANSFER_FAILED`` and a message naming the field.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import KVTransferFailedError
from ..handle import KV_DTYPES

__all__ = [
    "CHECKSUM_ALGOS",
    "COMPRESSIONS",
    "HEADER_STRUCT",
    "MAGIC",
    "TRAILER_MAGIC",
    "TRAILER_STRUCT",
    "VERSION",
    "Checksum",
    "Segment",
    "TransferHeader",
    "decode_header",
    "decode_trailer",
    "digest",
    "encode_header",
    "encode_trailer",
    "make_checksum",
]

MAGIC = b"SKVX"
TRAILER_MAGIC = b"SKVT"
# 2: the checksum is the digest of the per-message digests in order (a sender may reuse
# the digests kept for cached blocks); a version-1 peer is refused by its header
VERSION = 2

HEADER_STRUCT = struct.Struct("<4sHHQIIIIQIBBBBIIIQIIBBI")
SEGMENT_STRUCT = struct.Struct("<QII")
CHUNK_STRUCT = struct.Struct("<Q")
TRAILER_STRUCT = struct.Struct("<4sHBBQIQ")

#: dtype code on the wire <-> canonical dtype name (append only: codes are stable)
DTYPE_CODES: dict[str, int] = {name: i + 1 for i, name in enumerate(KV_DTYPES)}
_DTYPE_BY_CODE = {v: k for k, v in DTYPE_CODES.items()}
LAYOUT_CODES = {"NHD": 0, "HND": 1}
_LAYOUT_BY_CODE = {v: k for k, v in LAYOUT_CODES.items()}
#: checksum algorithm code -> name
CHECKSUM_ALGOS = {0: "none", 1: "crc32", 2: "xxh3_64"}
#: compression code -> name
COMPRESSIONS = {0: "none", 1: "zlib", 2: "zstd"}
HASH_KIND_NONE, HASH_KIND_BYTES, HASH_KIND_INT = 0, 1, 2
#: flags bit 0: the sender's block ids follow the hashes (u32 each), so the
#: receiver can plan zero-copy runs (see engine.py, "direct" mode)
FLAG_SRC_IDS = 1

# Limits that keep a malicious or corrupted header from making the receiver
# allocate absurd amounts before anything is checked.
MAX_BLOCKS = 1 << 24
MAX_SEGMENTS = 1 << 16
MAX_HASH_LEN = 64
MAX_DIM = 1 << 20


def _fail(msg: str, **details: object) -> KVTransferFailedError:
    return KVTransferFailedError(f"bad transfer header: {msg}", **details)


@dataclass(slots=True)
class Segment:
    """One handle's part of a transfer: its tokens, blocks and full-block hashes."""

    num_tokens: int
    num_blocks: int
    block_hashes: list = field(default_factory=list)


@dataclass(slots=True)
class TransferHeader:
    """Everything the receiver needs before the first payload byte arrives."""

    transfer_id: int
    src_rank: int
    dst_rank: int
    block_size: int
    dtype: str
    layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    segments: list[Segment]
    chunk_nbytes: list[int]
    blocks_per_chunk: int
    checksum_algo: str = "xxh3_64"
    compression: str = "none"
    flags: int = 0
    src_block_ids: list[int] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return sum(s.num_blocks for s in self.segments)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)

    @property
    def element_size(self) -> int:
        return KV_DTYPES[self.dtype][0]

    @property
    def bytes_per_block(self) -> int:
        return (
            2
            * self.num_layers
            * self.num_kv_heads
            * self.head_dim
            * self.block_size
            * self.element_size
        )

    @property
    def payload_nbytes(self) -> int:
        """Uncompressed KV bytes of all blocks."""
        return self.num_blocks * self.bytes_per_block

    @property
    def wire_nbytes(self) -> int:
        return sum(self.chunk_nbytes)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_nbytes)

    def chunk_blocks(self, c: int) -> tuple[int, int]:
        """Block index range ``[lo, hi)`` (over the whole transfer) of chunk ``c``."""
        lo = c * self.blocks_per_chunk
        return lo, min(lo + self.blocks_per_chunk, self.num_blocks)


def _hash_encoding(segments: Sequence[Segment]) -> tuple[int, int]:
    kinds = set()
    lens = set()
    for s in segments:
        for h in s.block_hashes:
            if isinstance(h, bytes | bytearray):
                kinds.add(HASH_KIND_BYTES)
                lens.add(len(h))
            elif isinstance(h, int) and not isinstance(h, bool):
                kinds.add(HASH_KIND_INT)
                lens.add(8)
            else:
                raise KVTransferFailedError(
                    f"block hash of type {type(h).__name__} cannot be sent; use bytes or int"
                )
    if not kinds:
        return HASH_KIND_NONE, 0
    if len(kinds) > 1 or len(lens) > 1:
        raise KVTransferFailedError("a transfer's block hashes must all be bytes of one length")
    hash_len = lens.pop()
    if not 0 < hash_len <= MAX_HASH_LEN:
        raise KVTransferFailedError(f"block hashes of {hash_len} bytes; at most {MAX_HASH_LEN}")
    return kinds.pop(), hash_len


def encode_header(h: TransferHeader) -> bytes:
    """Serialise ``h`` (raises ``KVTransferFailedError`` for unsendable values)."""
    kind, hash_len = _hash_encoding(h.segments)
    hashes = [x for s in h.segments for x in s.block_hashes]
    try:
        head = HEADER_STRUCT.pack(
            MAGIC,
            VERSION,
            h.flags,
            h.transfer_id,
            h.src_rank,
            h.dst_rank,
            len(h.segments),
            h.num_blocks,
            h.num_tokens,
            h.block_size,
            DTYPE_CODES[h.dtype],
            LAYOUT_CODES[h.layout],
            _code(CHECKSUM_ALGOS, h.checksum_algo),
            _code(COMPRESSIONS, h.compression),
            h.num_layers,
            h.num_kv_heads,
            h.head_dim,
            h.payload_nbytes,
            len(h.chunk_nbytes),
            h.blocks_per_chunk,
            kind,
            hash_len,
            len(hashes),
        )
    except (struct.error, KeyError) as exc:
        raise KVTransferFailedError(f"cannot encode transfer header: {exc}") from None
    if h.src_block_ids and len(h.src_block_ids) != h.num_blocks:
        raise KVTransferFailedError("src_block_ids must name every block of the transfer")
    flags = (h.flags | FLAG_SRC_IDS) if h.src_block_ids else (h.flags & ~FLAG_SRC_IDS)
    head = head[:6] + struct.pack("<H", flags) + head[8:]
    parts = [head]
    parts.extend(
        SEGMENT_STRUCT.pack(s.num_tokens, s.num_blocks, len(s.block_hashes)) for s in h.segments
    )
    parts.extend(CHUNK_STRUCT.pack(n) for n in h.chunk_nbytes)
    if kind == HASH_KIND_INT:
        parts.append(struct.pack(f"<{len(hashes)}q", *hashes))
    elif kind == HASH_KIND_BYTES:
        parts.extend(bytes(x) for x in hashes)
    if h.src_block_ids:
        try:
            parts.append(struct.pack(f"<{h.num_blocks}I", *h.src_block_ids))
        except struct.error as exc:
            raise KVTransferFailedError(f"cannot encode block ids: {exc}") from None
    return b"".join(parts)


def _code(table: dict[int, str], name: str) -> int:
    for k, v in table.items():
        if v == name:
            return k
    raise KeyError(name)


def decode_header(data: bytes) -> TransferHeader:
    """Parse and validate a header; every inconsistency is a ``KVTransferFailedError``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _fail(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_STRUCT.size:
        raise _fail(f"{len(data)} bytes, shorter than the fixed part ({HEADER_STRUCT.size})")
    (
        magic,
        version,
        flags,
        transfer_id,
        src_rank,
        dst_rank,
        num_segments,
        num_blocks,
        num_tokens,
        block_size,
        dtype_code,
        layout_code,
        algo_code,
        comp_code,
        num_layers,
        num_kv_heads,
        head_dim,
        payload_nbytes,
        num_chunks,
        blocks_per_chunk,
        hash_kind,
        hash_len,
        num_hashes,
    ) = HEADER_STRUCT.unpack_from(data, 0)
    if magic != MAGIC:
        raise _fail(f"magic {magic!r}, expected {MAGIC!r}", field="magic")
    if version != VERSION:
        raise _fail(f"version {version}, this build speaks {VERSION}", field="version")
    if dtype_code not in _DTYPE_BY_CODE:
        raise _fail(f"unknown dtype code {dtype_code}", field="dtype")
    if layout_code not in _LAYOUT_BY_CODE:
        raise _fail(f"unknown layout code {layout_code}", field="layout")
    if algo_code not in CHECKSUM_ALGOS:
        raise _fail(f"unknown checksum algorithm {algo_code}", field="checksum_algo")
    if comp_code not in COMPRESSIONS:
        raise _fail(f"unknown compression {comp_code}", field="compression")
    for name, v in (
        ("block_size", block_size),
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
    ):
        if not 0 < v <= MAX_DIM:
            raise _fail(f"{name}={v} out of range", field=name)
    if not 0 < num_segments <= MAX_SEGMENTS:
        raise _fail(f"num_segments={num_segments} out of range", field="num_segments")
    if not 0 < num_blocks <= MAX_BLOCKS:
        raise _fail(f"num_blocks={num_blocks} out of range", field="num_blocks")
    if not 0 < blocks_per_chunk <= num_blocks:
        raise _fail(f"blocks_per_chunk={blocks_per_chunk} out of range", field="blocks_per_chunk")
    if num_chunks != -(-num_blocks // blocks_per_chunk):
        raise _fail(
            f"num_chunks={num_chunks} but {num_blocks} blocks in chunks of {blocks_per_chunk}",
            field="num_chunks",
        )
    if hash_kind not in (HASH_KIND_NONE, HASH_KIND_BYTES, HASH_KIND_INT):
        raise _fail(f"unknown hash kind {hash_kind}", field="hash_kind")
    if hash_kind == HASH_KIND_NONE and (hash_len or num_hashes):
        raise _fail("hashes present without a hash kind", field="hash_kind")
    if hash_kind == HASH_KIND_INT and hash_len != 8:
        raise _fail(f"integer hashes must be 8 bytes, got {hash_len}", field="hash_len")
    if hash_kind == HASH_KIND_BYTES and not 0 < hash_len <= MAX_HASH_LEN:
        raise _fail(f"hash_len={hash_len} out of range", field="hash_len")
    if num_hashes > num_blocks:
        raise _fail(f"{num_hashes} hashes for {num_blocks} blocks", field="num_hashes")
    expected = (
        HEADER_STRUCT.size
        + num_segments * SEGMENT_STRUCT.size
        + num_chunks * CHUNK_STRUCT.size
        + num_hashes * hash_len
        + (num_blocks * 4 if flags & FLAG_SRC_IDS else 0)
    )
    if flags & ~FLAG_SRC_IDS:
        raise _fail(f"unknown flags {flags:#x}", field="flags")
    if len(data) != expected:
        raise _fail(f"{len(data)} bytes, expected {expected}", field="length")
    off = HEADER_STRUCT.size
    seg_meta = []
    for _ in range(num_segments):
        seg_meta.append(SEGMENT_STRUCT.unpack_from(data, off))
        off += SEGMENT_STRUCT.size
    chunk_nbytes = [CHUNK_STRUCT.unpack_from(data, off + i * 8)[0] for i in range(num_chunks)]
    off += num_chunks * CHUNK_STRUCT.size
    if hash_kind == HASH_KIND_INT:
        hashes: list = list(struct.unpack_from(f"<{num_hashes}q", data, off))
    else:
        hashes = [data[off + i * hash_len : off + (i + 1) * hash_len] for i in range(num_hashes)]
    off += num_hashes * hash_len
    src_ids = list(struct.unpack_from(f"<{num_blocks}I", data, off)) if flags & FLAG_SRC_IDS else []
    segments = []
    hi = 0
    for seg_tokens, seg_blocks, seg_hashes in seg_meta:
        if seg_blocks <= 0 or seg_tokens <= 0:
            raise _fail("empty segment", field="segments")
        if -(-seg_tokens // block_size) != seg_blocks:
            raise _fail(
                f"segment of {seg_tokens} tokens cannot have {seg_blocks} blocks of {block_size}",
                field="segments",
            )
        if seg_hashes > seg_tokens // block_size:
            raise _fail(
                f"segment has {seg_hashes} hashes for {seg_tokens // block_size} full blocks",
                field="segments",
            )
        segments.append(Segment(seg_tokens, seg_blocks, hashes[hi : hi + seg_hashes]))
        hi += seg_hashes
    h = TransferHeader(
        transfer_id=transfer_id,
        src_rank=src_rank,
        dst_rank=dst_rank,
        block_size=block_size,
        dtype=_DTYPE_BY_CODE[dtype_code],
        layout=_LAYOUT_BY_CODE[layout_code],
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        segments=segments,
        chunk_nbytes=chunk_nbytes,
        blocks_per_chunk=blocks_per_chunk,
        checksum_algo=CHECKSUM_ALGOS[algo_code],
        compression=COMPRESSIONS[comp_code],
        flags=flags,
        src_block_ids=src_ids,
    )
    if hi != num_hashes:
        raise _fail(f"segments claim {hi} hashes, header {num_hashes}", field="num_hashes")
    if h.num_blocks != num_blocks or h.num_tokens != num_tokens:
        raise _fail("segment totals disagree with the header", field="segments")
    if h.payload_nbytes != payload_nbytes:
        raise _fail(
            f"payload_nbytes={payload_nbytes}, geometry gives {h.payload_nbytes}",
            field="payload_nbytes",
        )
    for c, n in enumerate(chunk_nbytes):
        lo, hi_b = h.chunk_blocks(c)
        raw = (hi_b - lo) * h.bytes_per_block
        if h.compression == "none" and n != raw:
            raise _fail(f"chunk {c} has {n} bytes, expected {raw}", field="chunk_nbytes")
        if not 0 < n <= max(raw * 2, raw + 1024):  # zlib never more than doubles
            raise _fail(f"chunk {c} of {n} bytes out of range", field="chunk_nbytes")
    return h


def encode_trailer(transfer_id: int, num_chunks: int, algo: str, checksum: int) -> bytes:
    return TRAILER_STRUCT.pack(
        TRAILER_MAGIC, VERSION, _code(CHECKSUM_ALGOS, algo), 0, transfer_id, num_chunks, checksum
    )


def decode_trailer(data: bytes, header: TransferHeader) -> int:
    """The checksum in a trailer, after checking it belongs to ``header``'s transfer."""
    if len(data) != TRAILER_STRUCT.size:
        raise _fail(f"trailer of {len(data)} bytes, expected {TRAILER_STRUCT.size}")
    magic, version, algo, _pad, tid, num_chunks, checksum = TRAILER_STRUCT.unpack(bytes(data))
    if magic != TRAILER_MAGIC or version != VERSION:
        raise _fail(f"trailer magic/version {magic!r}/{version}", field="trailer")
    if tid != header.transfer_id or num_chunks != header.num_chunks:
        raise _fail("trailer belongs to another transfer", field="trailer")
    if CHECKSUM_ALGOS.get(algo) != header.checksum_algo:
        raise _fail("trailer checksum algorithm differs from the header's", field="trailer")
    return checksum


def digest(algo: str, buf: Any) -> int:
    """One message's checksum (``xxh3_64``, ``crc32``, or 0 for ``none``)."""
    if algo == "xxh3_64":
        import xxhash

        return int(xxhash.xxh3_64_intdigest(buf))
    if algo == "crc32":
        return zlib.crc32(buf)
    return 0


class Checksum:
    """Checksum of a payload that moves as messages (chunks or direct slabs).

    Each message gets its own digest (``update``, or ``add`` for one known
    already), and the value is the digest of the per-message digests packed in
    message order: the same bytes cut into other messages give another value,
    and a sender can reuse the digests of source pieces it hashed before.
    ``xxh3_64`` needs ``xxhash`` (~10x faster than crc32 here); ``crc32`` is
    zlib's, always available; ``none`` is 0.
    """

    __slots__ = ("_digests", "algo")

    def __init__(self, algo: str) -> None:
        if algo not in ("xxh3_64", "crc32", "none"):
            raise KVTransferFailedError(f"unknown checksum algorithm {algo!r}")
        self.algo = algo
        self._digests = array("Q")

    def update(self, buf: Any) -> None:
        """Digest one message's bytes."""
        if self.algo != "none":
            self._digests.append(digest(self.algo, buf))

    def add(self, message_digest: int) -> None:
        """One message's digest, computed earlier from the same bytes."""
        if self.algo != "none":
            self._digests.append(message_digest)

    def value(self) -> int:
        if self.algo == "none":
            return 0
        return digest(self.algo, self._digests.tobytes())


def make_checksum(enabled: bool) -> str:
    """The best available algorithm name when checksums are enabled."""
    if not enabled:
        return "none"
    try:
        import xxhash  # noqa: F401
    except ImportError:  # pragma: no cover - depends on environment
        return "crc32"
    return "xxh3_64"
