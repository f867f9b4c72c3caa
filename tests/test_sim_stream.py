"""Streamed sequential replay equals the in-memory one, request for request."""

from __future__ import annotations

import pytest

import traces
from sagellm_kv_cache.errors import KVConfigError
from sim.replay import replay_sequential
from sim.stream import replay_stream, scalar_columns


@pytest.fixture(scope="module")
def synthetic_parquet(tmp_path_factory):
    t = traces.generate_trace(600, seed=4, block_size=16, multi_turn_prob=0.5)
    p = tmp_path_factory.mktemp("stream") / "t.parquet"
    traces.write_trace(t, p)
    return t, p


@pytest.mark.parametrize("capacity", [40, 300, "10%", None])
def test_streamed_parquet_replay_equals_in_memory(synthetic_parquet, capacity):
    table, path = synthetic_parquet
    direct = replay_sequential(table, capacity)
    streamed = replay_stream(path, capacity, batch_size=37)
    assert streamed.records.drop("request_id").equals(direct.records.drop("request_id"))
    assert streamed.records["request_id"].to_list() == direct.records["request_id"].to_list()
    for k in ("token_hit_ratio", "block_hit_ratio", "request_hit_ratio", "evictions"):
        assert streamed.summary()[k] == direct.summary()[k]


def test_streamed_jsonl_replay_equals_in_memory():
    table = traces.read_trace()
    direct = replay_sequential(table, 2000)
    streamed = replay_stream(traces.DEFAULT_TRACE, 2000, batch_size=500)
    assert streamed.summary()["token_hit_ratio"] == direct.summary()["token_hit_ratio"]
    assert streamed.records["hit_blocks"].to_list() == direct.records["hit_blocks"].to_list()


def test_scalar_pass_has_no_block_hashes(synthetic_parquet):
    table, path = synthetic_parquet
    cols = scalar_columns(path)
    assert "block_hashes" not in cols.columns and cols.height == table.height


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_bad_batch_size_is_a_config_error(synthetic_parquet, bad):
    with pytest.raises(KVConfigError):
        replay_stream(synthetic_parquet[1], 40, batch_size=bad)
