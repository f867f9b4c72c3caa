"""vLLM's KV-event wire format: our encoder against a decoder written from vLLM's schema.

The structs (``_vllm_schema``) are written independently of ``vllm_wire``, from
the schema of ``vllm/distributed/kv_events.py`` (vLLM <= 0.23: every struct
``array_like=True``; events ``tag=True``). Our publisher's frames must decode
with them field for field.
"""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest
import zmq
from _vllm_schema import V_DECODER, VAllBlocksCleared
from conftest import make_pool

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError
from sagellm_kv_cache.observability import KVEventStream
from sagellm_kv_cache.observability import vllm_wire as w
from sagellm_kv_cache.observability.vllm_zmq import VLLMEventPublisher

TIMEOUT_MS = 5000


def sample_events():
    return [
        w.BlockStored(
            block_hashes=[1, 2**64 - 1, -(2**63)],
            parent_block_hash=7,
            token_ids=list(range(48)),
            block_size=16,
            lora_id=3,
            medium="GPU",
            lora_name="adapter",
            extra_keys=[("salt",), None, ("img", 2)],
            group_idx=1,
            kv_cache_spec_kind="full_attention",
            kv_cache_spec_sliding_window=4096,
        ),
        w.BlockStored([b"\x01" * 32], None, [5] * 16, 16, None, None, None),
        w.BlockRemoved(block_hashes=[1, 2**64 - 1], medium="CPU", group_idx=2),
        w.AllBlocksCleared(),
    ]


def test_array_encoding_is_vllm_positional_layout():
    payload = w.encode_batch(12.5, sample_events(), 3)
    raw = msgspec.msgpack.decode(payload)
    assert raw[0] == 12.5 and raw[2] == 3
    stored, plain, removed, cleared = raw[1]
    assert stored[:7] == ["BlockStored", [1, 2**64 - 1, -(2**63)], 7, list(range(48)), 16, 3, "GPU"]
    assert stored[7:] == [
        "adapter",
        [["salt"], None, ["img", 2]],
        1,
        "full_attention",
        4096,
    ]
    assert plain == ["BlockStored", [b"\x01" * 32], None, [5] * 16, 16, None, None] + [None] * 5
    assert removed == ["BlockRemoved", [1, 2**64 - 1], "CPU", 2]
    assert cleared == ["AllBlocksCleared"]


def test_independent_decoder_reads_every_field():
    payload = w.encode_batch(12.5, sample_events(), 3)
    batch = V_DECODER.decode(payload)  # extra trailing fields are ignored, as in vLLM
    assert (batch.ts, batch.data_parallel_rank) == (12.5, 3)
    s, p, r, c = batch.events
    assert (s.block_hashes, s.parent_block_hash, s.token_ids) == (
        [1, 2**64 - 1, -(2**63)],
        7,
        list(range(48)),
    )
    assert (s.block_size, s.lora_id, s.medium) == (16, 3, "GPU")
    assert (p.block_hashes, p.parent_block_hash, p.medium) == ([b"\x01" * 32], None, None)
    assert (r.block_hashes, r.medium) == ([1, 2**64 - 1], "CPU")
    assert isinstance(c, VAllBlocksCleared)


@pytest.mark.parametrize("encoding", ["array", "map"])
def test_round_trip_every_field(encoding):
    events = sample_events()
    batch = w.decode_batch(w.encode_batch(12.5, events, 3, encoding=encoding))
    assert batch == w.KVEventBatch(12.5, events, 3)


def test_map_encoding_is_tagged_maps_in_a_positional_batch():
    raw = msgspec.msgpack.decode(w.encode_batch(1.0, sample_events()[2:], 0, encoding="map"))
    assert raw == [
        1.0,
        [
            {
                "type": "BlockRemoved",
                "block_hashes": [1, 2**64 - 1],
                "medium": "CPU",
                "group_idx": 2,
            },
            {"type": "AllBlocksCleared"},
        ],
        0,
    ]


def test_decoder_accepts_older_and_newer_layouts():
    enc = msgspec.msgpack.encode
    # vLLM before `medium` (5 fields) and a future one with an extra trailing field
    old = enc([1.0, [["BlockStored", [1], None, [1, 2], 2, None], ["BlockRemoved", [1]]]])
    b = w.decode_batch(old)
    assert b.data_parallel_rank is None
    assert b.events == [
        w.BlockStored([1], None, [1, 2], 2, None, None, None),
        w.BlockRemoved([1], None),
    ]
    new = enc([2.0, [{"type": "BlockRemoved", "block_hashes": [9], "medium": "GPU", "x": 1}], 0])
    assert w.decode_batch(new).events == [w.BlockRemoved([9], "GPU")]
    as_map = enc({"ts": 3.0, "events": [["AllBlocksCleared"]], "data_parallel_rank": 1})
    assert w.decode_batch(as_map) == w.KVEventBatch(3.0, [w.AllBlocksCleared()], 1)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never valid msgpack
        b"",
        msgspec.msgpack.encode("hello"),
        msgspec.msgpack.encode([1.0]),
        msgspec.msgpack.encode(["x", []]),
        msgspec.msgpack.encode([1.0, [["Nope", [1]]]]),
        msgspec.msgpack.encode([1.0, [["BlockStored", "ab", None, [], 1, None]]]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [True], 1, None]]]),
        msgspec.msgpack.encode([1.0, [["BlockRemoved", [1.5]]]]),
        msgspec.msgpack.encode([1.0, [{"block_hashes": [1]}]]),
    ],
)
def test_garbage_payloads_raise_invalid_input(payload):
    with pytest.raises(KVInvalidInputError) as exc:
        w.decode_batch(payload)
    assert exc.value.code == "KV_INVALID_INPUT"


def test_hash_and_seq_helpers():
    digest = bytes(range(32))
    assert w.external_block_hash(digest) == int.from_bytes(digest[-8:], "big")
    assert w.external_block_hash(digest, as_int=False) == digest
    assert w.external_block_hash(-5) == -5
    for bad in (2**64, 1.5, "ab", True):
        with pytest.raises(KVInvalidInputError):
            w.external_block_hash(bad)
    assert w.pack_seq(258) == b"\x00" * 6 + b"\x01\x02"
    assert w.unpack_seq(w.END_SEQ) == -1
    with pytest.raises(KVInvalidInputError):
        w.unpack_seq(b"\x00")


# -- the publisher on ZMQ --------------------------------------------------------
def recv(sock):
    assert sock.poll(TIMEOUT_MS), "no message within the timeout"
    return sock.recv_multipart()


def test_pool_events_on_zmq_decode_with_the_independent_decoder():
    pool = make_pool(num_blocks=4, block_size=4)
    stream = KVEventStream(pool)
    pool.add_hook(stream)
    ctx = zmq.Context()
    pub = stream.publish_vllm(replay_endpoint="tcp://127.0.0.1:*", topic="kv", context=ctx)
    sub = ctx.socket(zmq.SUB)
    dealer = ctx.socket(zmq.DEALER)
    try:
        assert pub.endpoint.startswith("tcp://127.0.0.1:")
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        sub.connect(pub.endpoint)
        assert pub.wait_for_subscribers(1, timeout_s=5)
        a, _ = pool.alloc_with_prefix(list(range(8)))
        pool.cache_blocks(a)
        pool.free(a)  # ends the stored batch
        pool.evict(2)
        pool.reset()
        got = []
        for _ in range(3):
            topic, seq, payload = recv(sub)
            got.append((topic, int.from_bytes(seq, "big"), V_DECODER.decode(payload)))
        ha = [int.from_bytes(h[-8:], "big") for h in a.block_hashes]
        assert [(t, s) for t, s, _ in got] == [(b"kv", 0), (b"kv", 1), (b"kv", 2)]
        (stored,), (removed,), (cleared,) = (b.events for _, _, b in got)
        assert (stored.block_hashes, stored.parent_block_hash, stored.block_size) == (ha, None, 4)
        assert (stored.token_ids, stored.lora_id, stored.medium) == ([], None, "GPU")
        assert (removed.block_hashes, removed.medium) == (ha[::-1], "GPU")  # tail first
        assert isinstance(cleared, VAllBlocksCleared)
        assert all(b.data_parallel_rank == 0 for _, _, b in got)
        # replay from seq 1: buffered batches, then the end marker (-1, b"")
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart([b"", (1).to_bytes(8, "big")])
        replies = [recv(dealer) for _ in range(3)]
        assert [r[1] for r in replies] == [w.pack_seq(1), w.pack_seq(2), w.END_SEQ]
        assert replies[0][2] == w.encode_batch(got[1][2].ts, [w.BlockRemoved(ha[::-1], "GPU")], 0)
        assert replies[2][2] == b""
    finally:
        pub.close()
        sub.close(linger=0)
        dealer.close(linger=0)
        ctx.term()
    pool.alloc_with_prefix(list(range(100, 104)))  # after close: unsubscribed, nothing raises
    assert stream.num_callback_errors == 0


def test_publisher_refuses_bad_config_and_binds_loopback_by_default():
    with pytest.raises(KVConfigError):
        VLLMEventPublisher("localhost:5557")
    with pytest.raises(KVConfigError):
        VLLMEventPublisher(encoding="json")
    with pytest.raises(KVConfigError):
        VLLMEventPublisher(buffer_steps=0)
    ctx = zmq.Context()
    try:
        with VLLMEventPublisher(context=ctx) as pub:
            assert pub.endpoint.startswith("tcp://127.0.0.1:")
            with pytest.raises(KVConfigError):  # the port is taken
                VLLMEventPublisher(pub.endpoint, context=ctx)
        with pytest.raises(KVInvalidInputError):
            pub.publish([w.AllBlocksCleared()])
    finally:
        ctx.term()


def test_import_stays_light():
    code = (
        "import sys, sagellm_kv_cache, sagellm_kv_cache.observability as o;"
        "o.KVEventStream; o.ShadowCache;"
        "print(sorted(m for m in ('zmq', 'msgspec', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    # ShadowCache needs msgspec (the decoder); nothing imports zmq or pyarrow until used
    assert out.stdout.strip() == "['msgspec']"
