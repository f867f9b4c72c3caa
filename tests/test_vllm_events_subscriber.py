"""The subscriber: gap repair through the replay socket, garbage, floods, recording.

The acceptance test drives a ``BlockPool`` through a fixed sequence of
requests, records what vLLM would publish for it (one ``KVEventBatch`` per
request, built here from vLLM's schema), publishes it over ZMQ on 127.0.0.1
from a publisher written here the way vLLM's ``ZmqEventPublisher`` works,
with one batch left off the PUB socket (still in the replay buffer).
"""

from __future__ import annotations

import threading
from collections import deque

import msgspec
import pytest
import zmq
from _vllm_schema import VAllBlocksCleared as AllBlocksCleared
from _vllm_schema import VBlockRemoved as BlockRemoved
from _vllm_schema import VBlockStored as BlockStored
from _vllm_schema import VKVEventBatch as KVEventBatch

from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.errors import KVConfigError, KVEventGapError
from sagellm_kv_cache.observability import (
    EventRecorder,
    ShadowCache,
    VLLMEventSubscriber,
    iter_recording,
    read_recording,
)

TIMEOUT_S = 10.0
ENDPOINT_ANY = "tcp://127.0.0.1:*"


# -- a vLLM-like publisher (vLLM's schema: _vllm_schema) --
class FakeVLLMPublisher:
    """PUB + ROUTER replay as vLLM's ZmqEventPublisher does (thread serves replay)."""

    def __init__(self, ctx, buffer_steps=10_000, sndhwm=100_000):
        self.pub = ctx.socket(zmq.XPUB)  # a PUB that tells when the subscriber is in
        self.pub.setsockopt(zmq.SNDHWM, sndhwm)  # before bind: a listener copies options
        self.pub.bind(ENDPOINT_ANY)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.bind(ENDPOINT_ANY)
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.buffer = deque(maxlen=buffer_steps)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def wait_for_subscriber(self):
        assert self.pub.poll(TIMEOUT_S * 1000), "no subscription arrived"
        assert self.pub.recv()[:1] == b"\x01"

    def send(self, seq, payload, *, live=True, buffered=True):
        with self.lock:
            if live:
                self.pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
            if buffered:
                self.buffer.append((seq, payload))

    def send_raw(self, frames):
        self.pub.send_multipart(frames)

    def _serve(self):
        while not self.stop.is_set():
            if not self.router.poll(50):
                continue
            client, _, start = self.router.recv_multipart()
            start = int.from_bytes(start, "big")
            with self.lock:
                todo = [(s, p) for s, p in self.buffer if s >= start]
            for s, p in todo:
                self.router.send_multipart([client, b"", s.to_bytes(8, "big"), p])
            self.router.send_multipart([client, b"", (-1).to_bytes(8, "big", signed=True), b""])

    def close(self):
        self.stop.set()
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive()
        self.pub.close(linger=0)
        self.router.close(linger=0)


class BatchRecorder:
    """Pool hook: what vLLM would publish for the current request."""

    def __init__(self, block_size):
        self.block_size = block_size
        self.events = []

    def on_blocks_cached(self, ids, hashes, parent, ts):
        tokens = [t for h in hashes for t in [h % 1000] * self.block_size]
        self.events.append(BlockStored(list(hashes), parent, tokens, self.block_size, None, "GPU"))

    def on_evict_many(self, ids, hashes, reason, ts):
        self.events.append(BlockRemoved(list(hashes), "GPU"))

    def on_cleared(self, ts):
        self.events.append(AllBlocksCleared())

    def take(self):
        out, self.events = self.events, []
        return out


def chain(*ids):
    return [10**18 + 7 * i for i in ids]  # beyond 2**59: exercises big ints


REQUESTS = [
    chain(1, 2, 3),
    chain(1, 2, 4),
    chain(5, 6),
    chain(1, 2, 3, 7),  # fills the pool: evicts
    chain(8, 9, 10),
    "reset",
    chain(1, 2),
    chain(11, 12, 13, 14),
    chain(1, 2, 15),
]


def drive_pool():
    """Replay REQUESTS through a 6-block LRU pool; one vLLM batch per request."""
    bp = BlockPool(6, 4, "lru")
    rec = BatchRecorder(4)
    bp.hooks.append(rec)
    batches = []
    for i, req in enumerate(REQUESTS):
        if req == "reset":
            bp.reset()
        else:
            hit = bp.match_prefix(req)
            if hit:
                bp.touch(hit)
            ids = hit + bp.allocate(len(req) - len(hit))
            bp.cache_blocks(ids, req, len(hit))
            bp.release(ids)
        events = rec.take()
        assert events, f"request {i} published nothing"
        batches.append(msgspec.msgpack.encode(KVEventBatch(1000.0 + i, events, 0)))
    bp.check_invariants()
    return bp, batches


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()  # hangs if a test left a socket open


def poll_until(sub, done, timeout_s=TIMEOUT_S):
    """Poll in bounded steps until ``done()``; the timeout only bounds a failure."""
    for _ in range(int(timeout_s / 0.05)):
        if done():
            return
        sub.poll(0.05)
    assert done(), f"condition not reached within {timeout_s}s: {sub.stats()}"


def test_acceptance_gap_repaired_through_replay_equals_block_pool(ctx, tmp_path):
    bp, batches = drive_pool()
    dropped = 4
    pub = FakeVLLMPublisher(ctx)
    rec = EventRecorder(tmp_path / "rec", flush_rows=4)
    sub = VLLMEventSubscriber(
        pub.endpoint, pub.replay_endpoint, recorder=rec, on_gap="raise", context=ctx
    )
    try:
        pub.wait_for_subscriber()
        for seq, payload in enumerate(batches):
            pub.send(seq, payload, live=seq != dropped)
        poll_until(sub, lambda: sub.last_seq == len(batches) - 1)
    finally:
        sub.close()
        pub.close()
    assert (sub.num_gaps, sub.num_gaps_repaired, sub.num_gaps_unrecovered) == (1, 1, 0)
    assert sub.num_batches == len(batches)
    # everything was sent before the first poll: the replay answers dropped..newest,
    # and the live copies of dropped+1..newest are duplicates
    assert sub.num_replayed_batches == len(batches) - dropped
    assert sub.num_duplicates == len(batches) - dropped - 1
    assert sub.num_garbage == 0
    shadow = sub.shadow
    assert shadow.keys() == [(pub.endpoint, 0, "GPU")]
    assert shadow.blocks(pub.endpoint, 0, "GPU") == set(bp.cached)
    assert shadow.stale == set()
    # the recording holds every batch once, in sequence order, byte for byte
    table = read_recording(tmp_path / "rec")
    assert table.column("seq").to_pylist() == list(range(len(batches)))
    assert table.column("payload").to_pylist() == batches
    assert table.column("replayed").to_pylist()[dropped] is True
    assert len(list((tmp_path / "rec").glob("*.parquet"))) == 3  # 4 + 4 + 1 rows
    rebuilt = ShadowCache()
    for row, batch in iter_recording(tmp_path / "rec"):
        rebuilt.apply_batch(row["endpoint"], batch)
    assert rebuilt.blocks(pub.endpoint, 0, "GPU") == set(bp.cached)


def test_gap_beyond_the_replay_buffer_is_reported(ctx):
    _, batches = drive_pool()
    pub = FakeVLLMPublisher(ctx, buffer_steps=2)
    sub = VLLMEventSubscriber(pub.endpoint, pub.replay_endpoint, on_gap="raise", context=ctx)
    try:
        pub.wait_for_subscriber()
        pub.send(0, batches[0])
        for seq in (1, 2, 3):
            pub.send(seq, batches[seq], live=False)  # 1 falls out of the 2-batch buffer
        pub.send(4, batches[4])
        with pytest.raises(KVEventGapError) as exc:
            poll_until(sub, lambda: sub.last_seq == 4)
        assert exc.value.code == "KV_EVENT_GAP"
        assert exc.value.details == {"missing_from": 1, "missing_to": 2}
        assert sub.last_seq == 4  # 3 replayed, then 4 applied live; the listener goes on
        pub.send(5, batches[5])
        poll_until(sub, lambda: sub.last_seq == 5)
    finally:
        sub.close()
        pub.close()
    assert (sub.num_gaps, sub.num_gaps_repaired, sub.num_gaps_unrecovered) == (1, 0, 1)
    assert sub.gaps == [(1, 2)]
    assert sub.shadow.stale == {pub.endpoint}


def test_gap_without_replay_endpoint_is_counted(ctx):
    _, batches = drive_pool()
    pub = FakeVLLMPublisher(ctx)
    sub = VLLMEventSubscriber(pub.endpoint, context=ctx)  # on_gap="count"
    try:
        pub.wait_for_subscriber()
        pub.send(0, batches[0])
        pub.send(2, batches[2])
        poll_until(sub, lambda: sub.last_seq == 2)
    finally:
        sub.close()
        pub.close()
    assert (sub.num_gaps_unrecovered, sub.gaps, sub.num_batches) == (1, [(1, 1)], 2)


def test_garbage_is_counted_and_skipped(ctx):
    _, batches = drive_pool()
    pub = FakeVLLMPublisher(ctx)
    sub = VLLMEventSubscriber(pub.endpoint, pub.replay_endpoint, context=ctx)
    try:
        pub.wait_for_subscriber()
        pub.send(0, batches[0])
        garbage = [
            [b"only one frame"],
            [b"", b"short", batches[1]],
            [b"", (1).to_bytes(8, "big"), b"\xc1\xc1 not msgpack"],
            [b"", (1).to_bytes(8, "big"), msgspec.msgpack.encode({"x": 1})],
            [b"", (-5).to_bytes(8, "big", signed=True), batches[1]],
            [b"", (10**6).to_bytes(8, "big"), batches[1]],  # beyond the publisher's newest
        ]
        for frames in garbage:
            pub.send_raw(frames)
        pub.send(1, batches[1])
        poll_until(sub, lambda: sub.last_seq == 1)
    finally:
        sub.close()
        pub.close()
    assert sub.num_garbage == len(garbage)
    assert (sub.num_batches, sub.num_gaps, sub.num_gaps_unrecovered) == (2, 0, 0)


def test_flood_is_bounded_by_the_high_water_mark(ctx):
    """A flood while the subscriber does not read: ZMQ keeps at most rcvhwm + sndhwm
    batches (plus the kernel's socket buffers) and drops the rest; the drops come
    back as gaps, repaired through the replay socket (whose ROUTER, like vLLM's,
    keeps the default HWM of 1000 and may drop part of an answer: asked again)."""
    tokens = list(range(2**16, 2**16 + 60_000))  # ~300 KB per batch
    payload = msgspec.msgpack.encode(
        KVEventBatch(0.0, [BlockStored([1], None, tokens, 16, None, "GPU")], 0)
    )
    n = 200  # ~60 MB in all: far beyond the kernel's buffers on loopback
    pub = FakeVLLMPublisher(ctx, sndhwm=10)
    sub = VLLMEventSubscriber(pub.endpoint, pub.replay_endpoint, rcvhwm=10, context=ctx)
    try:
        pub.wait_for_subscriber()
        for seq in range(n):  # the subscriber reads nothing meanwhile
            pub.send(seq, payload)
        # read what survived; a dropped tail is invisible until asked for (catch_up)
        poll_until(sub, lambda: sub.poll(0.05) == 0 and sub.poll(0.05) == 0)
        sub.catch_up()
    finally:
        sub.close()
        pub.close()
    stats = sub.stats()
    assert sub.last_seq == n - 1
    assert sub.num_batches == n and sub.num_gaps_unrecovered == 0, stats
    assert sub.num_gaps == sub.num_gaps_repaired >= 1, stats
    assert sub.num_replayed_batches >= n // 2, stats  # most were dropped live
    assert sub.num_garbage == 0
    assert sub.shadow.blocks(pub.endpoint) == {1}


def test_publisher_restart_starts_over(ctx):
    _, batches = drive_pool()
    pub = FakeVLLMPublisher(ctx)
    sub = VLLMEventSubscriber(pub.endpoint, pub.replay_endpoint, context=ctx)
    try:
        pub.wait_for_subscriber()
        pub.send(0, batches[0])
        pub.send(1, batches[1])
        poll_until(sub, lambda: sub.last_seq == 1)
        pub.buffer.clear()
        pub.send(0, batches[2])  # numbering starts again
        poll_until(sub, lambda: sub.num_restarts == 1)
    finally:
        sub.close()
        pub.close()
    assert sub.last_seq == 0
    assert sub.shadow.blocks(pub.endpoint) == set(chain(5, 6))


def test_start_seq_repairs_what_was_published_before_the_subscriber(ctx):
    bp, batches = drive_pool()
    pub = FakeVLLMPublisher(ctx)
    for seq in range(len(batches) - 1):
        pub.send(seq, batches[seq], live=False)  # published before anyone listened
    sub = VLLMEventSubscriber(pub.endpoint, pub.replay_endpoint, start_seq=0, context=ctx)
    try:
        pub.wait_for_subscriber()
        pub.send(len(batches) - 1, batches[-1])
        poll_until(sub, lambda: sub.last_seq == len(batches) - 1)
    finally:
        sub.close()
        pub.close()
    # the replay (sent after the live batch) holds all of them; the live one is a duplicate
    assert (sub.num_gaps_repaired, sub.num_replayed_batches) == (1, len(batches))
    assert sub.num_duplicates == 1
    assert sub.shadow.blocks(pub.endpoint) == set(bp.cached)


def test_shadow_counts_implied_hits_and_unknown_removals():
    from sagellm_kv_cache.observability.vllm_wire import BlockRemoved as R
    from sagellm_kv_cache.observability.vllm_wire import BlockStored as S
    from sagellm_kv_cache.observability.vllm_wire import KVEventBatch as B

    sh = ShadowCache()
    sh.apply_batch("e", B(0.0, [S([1, 2, 3], None, [], 16, None, "GPU", None)], 0))
    sh.apply_batch("e", B(1.0, [S([4], 2, [], 16, None, "GPU", None)], 0))  # reuses 1, 2
    sh.apply_batch("e", B(2.0, [S([3], 2, [], 16, None, "GPU", None)], 0))  # already held
    sh.apply_batch("e", B(3.0, [R([9, 1], "GPU"), R([4], "CPU")], 0))
    assert sh.blocks("e") == {2, 3, 4}
    assert (sh.stored_blocks, sh.restored_blocks) == (4, 1)
    assert (sh.removed_blocks, sh.removed_unknown) == (1, 2)
    assert (sh.implied_hit_blocks, sh.implied_query_blocks) == (4, 9)
    assert (sh.implied_hit_tokens, sh.implied_query_tokens) == (64, 144)
    assert sh.sizes() == {("e", 0, "GPU"): 3, ("e", 0, "CPU"): 0}


def test_bad_subscriber_config_is_refused():
    for kwargs in ({"on_gap": "ignore"}, {"replay_endpoint": "nowhere"}):
        with pytest.raises(KVConfigError):
            VLLMEventSubscriber("tcp://127.0.0.1:5557", **kwargs)
    with pytest.raises(KVConfigError):
        VLLMEventSubscriber("127.0.0.1:5557")
    with pytest.raises(KVConfigError):
        EventRecorder("unused", flush_rows=0)
