"""KV events: a consumer rebuilds the pool's cache exactly from the stream."""

from __future__ import annotations

import json

import pytest
from conftest import make_pool
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVBudgetExceededError, KVInvalidInputError
from sagellm_kv_cache.observability import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheIndex,
    KVEventGapError,
    KVEventStream,
    MetricsCollector,
    MetricsHook,
    events_from_jsonl,
    events_to_jsonl,
    replay,
)
from sagellm_kv_cache.prefix_cache import PrefixCache


def make_streamed_pool(maxlen: int = 65536, **kwargs):
    pool = make_pool(**kwargs)
    stream = KVEventStream(pool, maxlen=maxlen)
    pool.add_hook(stream)
    return pool, stream


def test_events_of_a_known_sequence():
    pool, stream = make_streamed_pool()  # 8 blocks of 4 tokens
    a, _ = pool.alloc_with_prefix(list(range(12)))
    pool.cache_blocks(a)
    pool.free(a)
    b, _ = pool.alloc_with_prefix(list(range(8)) + list(range(100, 108)))
    pool.cache_blocks(b)
    pool.free(b)
    c, _ = pool.alloc_with_prefix(list(range(200, 224)))  # evicts blocks 2, 4, 3
    pool.evict(1)  # block 1
    pool.reset()
    ha, hb = a.block_hashes, b.block_hashes
    events = stream.events_since(0)
    assert [type(e) for e in events] == [
        BlockStored,
        BlockStored,
        BlockRemoved,
        BlockRemoved,
        AllBlocksCleared,
    ]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    s1, s2, r1, r2, _ = events
    assert (s1.block_hashes, s1.parent_block_hash, s1.block_ids, s1.block_size) == (
        tuple(ha),
        None,
        (0, 1, 2),
        4,
    )
    # B's new blocks chain on A's second block, which B hit
    assert (s2.block_hashes, s2.parent_block_hash, s2.block_ids) == (tuple(hb[2:]), ha[1], (3, 4))
    assert (r1.block_hashes, r1.block_ids, r1.reason) == (
        (ha[2], hb[3], hb[2]),
        (2, 4, 3),
        "capacity",
    )
    assert (r2.block_hashes, r2.block_ids, r2.reason) == ((ha[1],), (1,), "explicit")
    assert replay(events) == {}
    assert replay(events[:4]) == {ha[0]: 0}
    assert c.is_freed


def test_each_chain_gets_its_own_stored_event():
    pool, stream = make_streamed_pool()
    x, _ = pool.alloc_with_prefix(list(range(8)))
    z, _ = pool.alloc_with_prefix(list(range(50, 58)))
    pool.cache_blocks(x)
    pool.cache_blocks(z)  # no pool event in between: only the chain tells them apart
    events = stream.events_since(0)
    assert [(e.block_ids, e.parent_block_hash) for e in events] == [((0, 1), None), ((2, 3), None)]


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 2), st.integers(1, 32)),
        st.tuples(st.just("cache"), st.integers(0, 7), st.integers(0, 32)),
        st.tuples(st.just("free"), st.integers(0, 7)),
        st.tuples(st.just("evict"), st.integers(1, 8)),
        st.tuples(st.just("invalidate"), st.integers(0, 7)),
        st.tuples(st.just("clear")),
        st.tuples(st.just("reset")),
    ),
    max_size=40,
)
# three prompts sharing a first block, so lookups hit partially
BASES = [
    list(range(4)) + list(range(10, 38)),
    list(range(4)) + list(range(50, 78)),
    list(range(100, 132)),
]


@settings(max_examples=150, deadline=None)
@given(ops=OPS)
def test_replay_rebuilds_the_cache_exactly(ops):
    pool, stream = make_streamed_pool()
    collector = MetricsCollector()
    pool.add_hook(MetricsHook(collector, pool))
    live = CacheIndex()
    stream.subscribe(live)
    handles = []
    dropped = 0
    for op in ops:
        kind = op[0]
        if kind == "alloc":
            try:
                h, _ = pool.alloc_with_prefix(BASES[op[1]][: op[2]])
            except KVBudgetExceededError:
                continue
            handles.append(h)
        elif kind == "cache" and handles:
            h = handles[op[1] % len(handles)]
            # at most the handle's tokens (more is a caller error, KVInvalidInputError)
            pool.cache_blocks(h, num_tokens=min(op[2], h.num_tokens) or None)
        elif kind == "free" and handles:
            pool.free(handles.pop(op[1] % len(handles)))
        elif kind == "evict":
            dropped += len(pool.evict(op[1]))
        elif kind == "invalidate" and handles:
            dropped += pool.invalidate(handles[op[1] % len(handles)].block_hashes)
        elif kind == "clear":
            bp = pool.block_pool
            dropped += bp.num_evictable
            PrefixCache(pool=pool).clear()
        elif kind == "reset":
            pool.reset()
            handles.clear()
        stream.flush()
        assert live.blocks == pool.block_pool.cached
    events = stream.events_since(0)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert replay(events) == pool.block_pool.cached
    assert replay(events_from_jsonl(events_to_jsonl(events))) == pool.block_pool.cached
    # every explicit / clear drop is an event and a counted eviction
    removed = [e for e in events if isinstance(e, BlockRemoved) and e.reason != "capacity"]
    assert sum(len(e.block_hashes) for e in removed) == dropped
    explicit = sum(
        collector.get_sample_value(
            "sagellm_kv_evictions_total", {"pool": "default", "reason": r, "policy": "lru"}
        )
        for r in ("explicit", "clear")
    )
    assert explicit == dropped


def fill(pool, n_requests: int) -> None:
    """``n_requests`` 1-block prompts never seen by ``pool``, each cached and
    freed (one stored event each)."""
    start = pool.get_stats()["prefix_requests"]
    for i in range(start, start + n_requests):
        h, _ = pool.alloc_with_prefix([1000 + i] * 4)
        pool.cache_blocks(h)
        pool.free(h)


def test_ring_buffer_overflow_is_reported_as_a_gap():
    pool, stream = make_streamed_pool(maxlen=3, num_blocks=64)
    fill(pool, 5)
    assert (stream.first_seq, stream.last_seq, len(stream)) == (3, 5, 3)
    assert [e.seq for e in stream.events_since(2)] == [3, 4, 5]
    assert stream.events_since(5) == []
    with pytest.raises(KVEventGapError) as exc:
        stream.events_since(1)
    assert exc.value.code == "KV_EVENT_GAP"
    assert (exc.value.details["missing_from"], exc.value.details["missing_to"]) == (2, 2)
    with pytest.raises(KVEventGapError):
        stream.events_since(0)
    with pytest.raises(KVInvalidInputError):
        stream.events_since(6)  # a sequence number this stream never issued


def test_resync_from_snapshot_after_a_gap():
    pool, stream = make_streamed_pool(maxlen=2, num_blocks=64)
    index = CacheIndex()
    fill(pool, 2)
    index.apply_many(stream.events_since(index.last_seq))
    fill(pool, 3)
    with pytest.raises(KVEventGapError):
        stream.events_since(index.last_seq)
    index.apply_many(stream.snapshot_events())
    assert index.blocks == pool.block_pool.cached
    fill(pool, 1)
    index.apply_many(stream.events_since(index.last_seq))
    assert index.blocks == pool.block_pool.cached
    assert len(index) == 6


def test_replay_refuses_a_hole():
    pool, stream = make_streamed_pool(num_blocks=64)
    fill(pool, 3)
    events = stream.events_since(0)
    with pytest.raises(KVEventGapError):
        replay([events[0], events[2]])
    with pytest.raises(KVEventGapError):
        replay(events[1:])  # does not start at 1 nor with a clear


def test_subscribers_see_every_event_once_and_errors_are_contained():
    pool, stream = make_streamed_pool(num_blocks=64)
    seen = []
    unsubscribe = stream.subscribe(seen.append)

    def broken(event):
        raise RuntimeError("subscriber bug")

    stream.subscribe(broken)
    fill(pool, 3)  # the pool keeps working although a subscriber raises
    stream.flush()
    assert [e.seq for e in seen] == [1, 2, 3]
    assert stream.num_callback_errors == 3
    unsubscribe()
    fill(pool, 1)
    stream.flush()
    assert len(seen) == 3
    assert pool.block_pool.num_cached == 4


def test_stored_batch_is_published_at_the_next_pool_event():
    pool, stream = make_streamed_pool()
    seen = []
    stream.subscribe(seen.append)
    h, _ = pool.alloc_with_prefix(list(range(8)))
    pool.cache_blocks(h)
    assert seen == []  # the chain might continue
    pool.free(h)
    assert [(type(e), e.block_ids) for e in seen] == [(BlockStored, (0, 1))]


def test_jsonl_round_trip_with_bytes_and_int_hashes():
    pool, stream = make_streamed_pool(num_blocks=16)
    h, _ = pool.alloc_with_prefix(list(range(8)))
    pool.cache_blocks(h)
    g, _ = pool.alloc_with_prefix(block_hashes=[11, 12], num_tokens=9)  # trace ids
    pool.cache_blocks(g)
    pool.free(g)
    assert pool.evict(1) == [3]
    pool.reset()
    events = stream.events_since(0)
    text = events_to_jsonl(events)
    lines = text.splitlines()
    assert len(lines) == len(events) == 4
    first = json.loads(lines[0])
    assert first["type"] == "block_stored"
    assert first["block_hashes"] == [x.hex() for x in h.block_hashes]
    assert json.loads(lines[1])["block_hashes"] == [11, 12]
    assert events_from_jsonl(text) == events
    assert events_from_jsonl(lines + [""]) == events


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        '{"type": "block_stored", "seq": 1, "ts": 0.0}',
        '{"type": "nope", "seq": 1, "ts": 0.0}',
        '{"type": "block_removed", "seq": "1", "ts": 0.0, "block_hashes": [], "block_ids": [], "reason": "x"}',
        '{"type": "block_removed", "seq": 1, "ts": 0.0, "block_hashes": ["zz"], "block_ids": [1], "reason": "x"}',
        '{"type": "block_removed", "seq": 1, "ts": 0.0, "block_hashes": ["aa"], "block_ids": [], "reason": "x"}',
        '{"type": "block_stored", "seq": 1, "ts": 0.0, "block_hashes": [1.5], "block_ids": [1], "parent_block_hash": null}',
    ],
)
def test_malformed_lines_are_refused(line):
    with pytest.raises(KVInvalidInputError, match="line 1"):
        events_from_jsonl(line)


_EDGE_LINES = [
    '{"type": "block_stored", "seq": 1, "ts": 0, "block_hashes": ["0a", 7], "block_ids": [1, 2]}',
    '{"type": "block_stored", "seq": 2, "ts": 1.5, "block_hashes": [18446744073709551616], '
    '"block_ids": [3], "parent_block_hash": "ff", "block_size": 16, "extra": [1]}',
    '{"type": "block_removed", "seq": 3, "ts": 2.0, "block_hashes": [7], "block_ids": [2], '
    '"reason": "capacity"}',
    '{"type": "all_blocks_cleared", "seq": 4, "ts": 3}',
    '{"type": "all_blocks_cleared", "seq": true, "ts": 3}',
    '{"type": "block_stored", "seq": 5, "ts": false, "block_hashes": [], "block_ids": []}',
    '{"type": "block_stored", "seq": 5, "ts": 1, "block_hashes": [null], "block_ids": [1]}',
    '{"type": "block_stored", "seq": 5, "ts": 1, "block_hashes": [1], "block_ids": [true]}',
    '{"type": "block_stored", "seq": 5, "ts": 1, "block_hashes": [1], "block_ids": [1], '
    '"block_size": 1.0}',
    '{"type": "block_removed", "seq": 5, "ts": 1, "block_hashes": [1], "block_ids": [1], '
    '"reason": 3}',
    "[1, 2]",
    '{"seq": 1, "ts": 0}',
]


@pytest.mark.parametrize("line", _EDGE_LINES)
def test_msgspec_fast_path_decodes_exactly_as_the_field_parser(line, monkeypatch):
    """Differential: each line gives the same event, or the same error, with the typed
    structs (msgspec) as with the field-by-field parser alone."""
    pytest.importorskip("msgspec")
    from sagellm_kv_cache.observability import event_json

    def decode() -> object:
        try:
            return events_from_jsonl(line)
        except KVInvalidInputError as exc:
            return ("error", exc.code, str(exc))

    fast = decode()
    monkeypatch.setattr(event_json, "_FAST", [None])  # the field parser alone
    assert decode() == fast


def test_msgspec_fast_path_takes_the_valid_lines():
    pytest.importorskip("msgspec")
    from sagellm_kv_cache.observability._event_structs import decode_line

    assert [decode_line(line) is not None for line in _EDGE_LINES[:5]] == [1, 1, 1, 1, 0]
