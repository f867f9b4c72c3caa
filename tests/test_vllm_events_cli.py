"""``sage-kv-stats listen``, the subscriber's Prometheus figures, and recording -> trace."""

from __future__ import annotations

import json

import click
import pytest
import zmq
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from cli.events_cmds import listen
from sagellm_kv_cache.errors import KVConfigError
from sagellm_kv_cache.observability import EventRecorder, SubscriberCollector, VLLMEventSubscriber
from sagellm_kv_cache.observability.vllm_wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    encode_batch,
)
from sagellm_kv_cache.observability.vllm_zmq import VLLMEventPublisher
from sim.replay import replay_sequential
from traces._common import BASE_COLUMNS
from traces.kv_events import recording_to_trace


def stored(hashes, parent, medium="GPU"):
    return BlockStored(hashes, parent, [], 4, None, medium, None)


# requests as vLLM reports them (block_size 4):
#   A computes 1,2,3            -> chain 1,2,3
#   B hits 1,2, computes 4      -> chain 1,2,4
#   C hits 1,2,3, computes 5,6  -> chain 1,2,3,5,6
#   the engine evicts 4 (not a request); a CPU copy (other medium) is skipped
#   D computes 7                -> chain 7
BATCHES = [
    [stored([1, 2, 3], None)],
    [stored([4], 2)],
    [stored([5, 6], 3), stored([5, 6], 3, medium="CPU")],
    [BlockRemoved([4], "GPU")],
    [stored([7], None)],
]


def record(tmp_path, batches=BATCHES, endpoint="tcp://127.0.0.1:1", rank=0):
    rec = EventRecorder(tmp_path, flush_rows=2)
    for seq, events in enumerate(batches):
        batch = KVEventBatch(100.0 + seq, events, rank)
        payload = encode_batch(batch.ts, events, rank)
        rec.add(
            arrival_s=1.0 + seq,
            endpoint=endpoint,
            topic=b"",
            seq=seq,
            replayed=False,
            batch=batch,
            payload=payload,
        )
    rec.close()
    return tmp_path


def test_recording_converts_to_a_trace_that_replays_exactly(tmp_path):
    table = recording_to_trace(record(tmp_path / "rec"))
    assert table.columns == list(BASE_COLUMNS)
    assert table["block_hashes"].to_list() == [[1, 2, 3], [1, 2, 4], [1, 2, 3, 5, 6], [7]]
    assert table["input_length"].to_list() == [12, 12, 20, 4]
    assert table["arrival_s"].to_list() == [0.0, 1.0, 2.0, 4.0]
    assert table["request_id"][0] == "tcp://127.0.0.1:1#0:0.0"
    infinite = replay_sequential(table, None)
    assert (infinite.hit_blocks, infinite.full_blocks) == (5, 12)  # 0 + 2 + 3 + 0
    # 4 blocks, LRU: C (5 blocks) never fits; D evicts 3
    small = replay_sequential(table, 4, "lru")
    assert small.records["hit_blocks"].to_list() == [0, 2, 0, 0]
    assert (small.hit_blocks, small.evictions) == (2, 1)
    cpu = recording_to_trace(tmp_path / "rec", medium="CPU")
    # its parent 3 was never stored on CPU: kept as the chain's first block
    assert cpu["block_hashes"].to_list() == [[3, 5, 6]]
    assert cpu["input_length"].to_list() == [12]


def test_conversion_wraps_uint64_and_needs_one_engine(tmp_path):
    rec = record(tmp_path / "a", [[stored([2**64 - 1, b"\x00" * 24 + b"\xff" * 8], None)]])
    assert recording_to_trace(rec)["block_hashes"].to_list() == [[-1, -1]]
    record(tmp_path / "a", BATCHES[:1], endpoint="tcp://127.0.0.1:2")
    with pytest.raises(KVConfigError) as exc:
        recording_to_trace(rec)
    assert exc.value.code == "KV_CONFIG_INVALID"
    assert len(recording_to_trace(rec, endpoint="tcp://127.0.0.1:2")) == 1
    with pytest.raises(KVConfigError):
        recording_to_trace(rec, endpoint="tcp://nowhere:1")


def group():
    """A local group: cli/main.py registers ``listen`` in the real one."""

    @click.group()
    def g():
        pass

    g.add_command(listen)
    return g


def test_listen_records_recovers_and_summarises(tmp_path):
    ctx = zmq.Context()
    pub = VLLMEventPublisher(replay_endpoint="tcp://127.0.0.1:*", context=ctx)
    try:
        for events in BATCHES:  # published before the listener: recovered by --start-seq 0
            pub.publish(events, ts=100.0)
        out = tmp_path / "rec"
        result = CliRunner().invoke(
            group(),
            [
                "listen",
                pub.endpoint,
                "--replay-endpoint",
                pub.replay_endpoint,
                "--out",
                str(out),
                "--start-seq",
                "0",
                "--max-batches",
                str(len(BATCHES)),
                "--duration",
                "30",  # bounds a failure only
                "--capacity-blocks",
                "10",
                "--quiet",
            ],
        )
    finally:
        pub.close()
        ctx.term()
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "listen_summary.json").read_text())
    assert summary["stats"]["batches"] == len(BATCHES)
    assert summary["stats"]["gaps_repaired"] == 1 and summary["stats"]["gaps_unrecovered"] == 0
    assert summary["shadow_blocks"] == {
        f"{pub.endpoint}|0|GPU": 6,  # 1, 2, 3, 5, 6, 7 (4 removed)
        f"{pub.endpoint}|0|CPU": 2,  # 5, 6
    }
    assert summary["parts"] == ["events-00000.parquet"]
    assert "held 8 blocks (80.0% of 10)" in result.output
    table = recording_to_trace(out)
    assert len(table) == 4


def test_listen_refuses_a_bad_endpoint(tmp_path):
    result = CliRunner().invoke(group(), ["listen", "nowhere", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "ZMQ endpoint" in result.output


def test_subscriber_metrics_exposition():
    ctx = zmq.Context()
    pub = VLLMEventPublisher(replay_endpoint="tcp://127.0.0.1:*", context=ctx)
    sub = VLLMEventSubscriber(pub.endpoint, pub.replay_endpoint, start_seq=0, context=ctx)
    try:
        for events in BATCHES + [[AllBlocksCleared()]]:
            pub.publish(events, ts=1.0)
        assert sub.catch_up() == len(BATCHES) + 1
        text = SubscriberCollector([sub]).render()
    finally:
        sub.close()
        pub.close()
        ctx.term()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    ep = (("endpoint", pub.endpoint),)
    assert samples[("sagellm_kv_events_batches_total", ep)] == 6
    assert samples[("sagellm_kv_events_events_total", ep)] == 7
    assert samples[("sagellm_kv_events_gaps_total", ep + (("outcome", "repaired"),))] == 1
    assert samples[("sagellm_kv_events_stored_blocks_total", ep)] == 9
    assert samples[("sagellm_kv_events_removed_blocks_total", ep)] == 1
    # implied reuse (tokens): B reuses 1,2 (8), both C stores reuse 1,2,3 on GPU (12) and
    # nothing on CPU (0): hits 20 of queries 12 + 12 + 20 + 8 + 4 = 56
    assert samples[("sagellm_kv_events_implied_prefix_cache_hits_total", ep)] == 20
    assert samples[("sagellm_kv_events_implied_prefix_cache_queries_total", ep)] == 56
    assert samples[("sagellm_kv_events_last_seq", ep)] == 5
    gpu = ep + (("medium", "GPU"), ("rank", "0"))
    assert samples[("sagellm_kv_events_shadow_blocks", gpu)] == 0  # cleared
