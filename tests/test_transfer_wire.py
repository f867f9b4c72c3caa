"""Wire format of KV transfers: round trips and validation of every field."""

from __future__ import annotations

import struct

import pytest

from sagellm_kv_cache.errors import KVTransferFailedError
from sagellm_kv_cache.transfer.wire import (
    HEADER_STRUCT,
    VERSION,
    Checksum,
    Segment,
    TransferHeader,
    decode_header,
    decode_trailer,
    digest,
    encode_header,
    encode_trailer,
)


def make_header(**overrides) -> TransferHeader:
    kw = dict(
        transfer_id=7,
        src_rank=0,
        dst_rank=1,
        block_size=4,
        dtype="float16",
        layout="NHD",
        num_layers=2,
        num_kv_heads=2,
        head_dim=4,
        segments=[
            Segment(10, 3, [b"\x01" * 32, b"\x02" * 32]),
            Segment(4, 1, [b"\x03" * 32]),
        ],
        chunk_nbytes=[3 * 256, 256],
        blocks_per_chunk=3,
    )
    kw.update(overrides)
    return TransferHeader(**kw)


def test_header_round_trip_keeps_every_field():
    h = make_header()
    got = decode_header(encode_header(h))
    assert got == h
    assert got.num_blocks == 4 and got.num_tokens == 14
    assert got.bytes_per_block == 256 and got.payload_nbytes == 1024
    assert [s.block_hashes for s in got.segments] == [[b"\x01" * 32, b"\x02" * 32], [b"\x03" * 32]]


def test_integer_hashes_round_trip():
    h = make_header(segments=[Segment(8, 2, [-5, 2**62])], chunk_nbytes=[512], blocks_per_chunk=2)
    assert decode_header(encode_header(h)).segments[0].block_hashes == [-5, 2**62]


def test_mixed_hash_widths_are_refused():
    h = make_header(segments=[Segment(8, 2, [b"a" * 32, b"b" * 16])], chunk_nbytes=[512])
    with pytest.raises(KVTransferFailedError, match="one length"):
        encode_header(h)


def _patch(raw: bytes, index: int, value) -> bytes:
    fields = list(HEADER_STRUCT.unpack_from(raw, 0))
    fields[index] = value
    return HEADER_STRUCT.pack(*fields) + raw[HEADER_STRUCT.size :]


# index into HEADER_STRUCT's fields, bad value, field named in the error
BAD_FIELDS = [
    (0, b"XXXX", "magic"),
    (1, 1, "version"),
    (6, 0, "num_segments"),
    (7, 5, "segment totals"),  # num_blocks disagrees with the segments
    (8, 99, "segment totals"),
    (9, 0, "block_size"),
    (10, 200, "dtype"),
    (11, 9, "layout"),
    (12, 9, "checksum"),
    (13, 9, "compression"),
    (14, 0, "num_layers"),
    (17, 12345, "payload_nbytes"),
    (18, 5, "num_chunks"),
    (19, 0, "blocks_per_chunk"),
    (20, 7, "hash kind"),
    (22, 4, "bytes, expected"),  # num_hashes vs actual length
]


@pytest.mark.parametrize(("index", "value", "needle"), BAD_FIELDS)
def test_corrupted_header_fields_raise_typed_errors(index, value, needle):
    raw = _patch(encode_header(make_header()), index, value)
    with pytest.raises(KVTransferFailedError, match=needle) as info:
        decode_header(raw)
    assert info.value.code == "KV_TRANSFER_FAILED"


@pytest.mark.parametrize("raw", [b"", b"SKVX", b"\x00" * 200, "text"])
def test_garbage_is_refused(raw):
    with pytest.raises(KVTransferFailedError):
        decode_header(raw)


def test_truncated_and_extended_headers_are_refused():
    raw = encode_header(make_header())
    with pytest.raises(KVTransferFailedError, match="expected"):
        decode_header(raw[:-1])
    with pytest.raises(KVTransferFailedError, match="expected"):
        decode_header(raw + b"\x00")


def test_chunk_size_must_match_geometry_when_uncompressed():
    with pytest.raises(KVTransferFailedError, match="chunk 1"):
        decode_header(encode_header(make_header(chunk_nbytes=[768, 255])))


def test_segment_blocks_must_match_tokens():
    bad = make_header(segments=[Segment(10, 2, []), Segment(4, 2, [])], chunk_nbytes=[768, 256])
    with pytest.raises(KVTransferFailedError, match="segment"):
        decode_header(encode_header(bad))


def test_trailer_round_trip_and_mismatch():
    h = make_header()
    raw = encode_trailer(7, 2, "xxh3_64", 0xDEADBEEF)
    assert decode_trailer(raw, h) == 0xDEADBEEF
    with pytest.raises(KVTransferFailedError, match="another transfer"):
        decode_trailer(encode_trailer(8, 2, "xxh3_64", 1), h)
    with pytest.raises(KVTransferFailedError, match="algorithm"):
        decode_trailer(encode_trailer(7, 2, "crc32", 1), h)
    with pytest.raises(KVTransferFailedError, match="trailer"):
        decode_trailer(raw[:-1], h)


@pytest.mark.parametrize("algo", ["xxh3_64", "crc32"])
def test_message_checksum_folds_per_message_digests_and_sees_one_bit(algo):
    data = bytes(range(256)) * 100
    messages = [data[i : i + 777] for i in range(0, len(data), 777)]
    hashed, kept = Checksum(algo), Checksum(algo)
    for m in messages:
        hashed.update(m)
        kept.add(digest(algo, m))  # a digest kept from an earlier send of the same bytes
    assert hashed.value() == kept.value() != 0
    whole = Checksum(algo)
    whole.update(data)
    assert whole.value() != hashed.value()  # the same bytes cut otherwise: another value
    flipped = bytearray(data)
    flipped[1234] ^= 1
    other = Checksum(algo)
    for i in range(0, len(flipped), 777):
        other.update(bytes(flipped[i : i + 777]))
    assert other.value() != hashed.value()
    assert Checksum("none").value() == 0


def test_header_is_not_pickle():
    raw = encode_header(make_header())
    assert raw[:4] == b"SKVX"
    assert struct.unpack_from("<H", raw, 4)[0] == VERSION == 2
