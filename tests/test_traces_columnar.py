"""Columnar block hashes (flat values + offsets) and the msgspec fast path of the JSONL readers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import traces
import traces.bailian as bailian
import traces.mooncake as mooncake
from traces.columnar import FlatHashes, StreamedHashes, flat_from_lists, hash_arrays, list_series


def test_flat_values_and_offsets_round_trip():
    lists = [[5, 6, 7], [], [9], [-(2**63), 2**63 - 1]]
    values, offsets = flat_from_lists(lists)
    assert values.tolist() == [5, 6, 7, 9, -(2**63), 2**63 - 1]
    assert offsets.tolist() == [0, 3, 3, 4, 6]
    s = list_series(values, offsets)
    assert s.dtype == pl.List(pl.Int64)
    assert s.to_list() == lists
    v2, o2 = hash_arrays(s)
    assert v2.tolist() == values.tolist() and o2.tolist() == offsets.tolist()
    assert [FlatHashes(values, offsets)[i] for i in range(4)] == lists


def test_empty_column_has_one_offset():
    values, offsets = hash_arrays(pl.Series("block_hashes", [], dtype=pl.List(pl.Int64)))
    assert len(values) == 0 and offsets.tolist() == [0]


def test_table_hashes_are_flat_without_a_values_copy():
    df = traces.read_trace()
    values, offsets = hash_arrays(df)
    assert offsets[-1] == len(values) == df["block_hashes"].list.len().sum()
    again, _ = hash_arrays(df)
    assert np.shares_memory(values, again)  # the column's own buffer, not a copy


def test_streamed_hashes_hold_one_batch_and_refuse_going_back():
    df = traces.read_trace()
    batches = (df["block_hashes"].slice(s, 1000) for s in range(0, df.height, 1000))
    col = StreamedHashes(batches, df.height)
    full = df["block_hashes"].to_list()
    assert len(col) == df.height
    assert [col[i] for i in range(df.height)] == full
    with pytest.raises(IndexError):
        col[5]


@pytest.mark.parametrize(
    ("reader", "module", "name"),
    [
        (mooncake.iter_mooncake_records, mooncake, "mooncake"),
        (bailian.iter_bailian_records, bailian, "bailian-synthetic-sample"),
    ],
)
def test_msgspec_fast_path_equals_the_field_parser(reader, module, name, monkeypatch):
    path = traces.bundled_path(name)
    fast = list(reader(path))
    monkeypatch.setattr(module, "decode_line", lambda raw, kind: None)
    assert list(reader(path)) == fast


@pytest.mark.parametrize(
    "line",
    [
        '{"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [true]}',
        '{"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [18446744073709551615]}',
        '{"timestamp": -1, "input_length": 3, "output_length": 1, "hash_ids": [1]}',
        '{"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [1, 2]}',
    ],
)
def test_msgspec_rejects_go_to_the_field_parser_error(tmp_path, line):
    from sagellm_kv_cache.errors import KVTraceFormatError

    p = tmp_path / "t.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(KVTraceFormatError) as info:
        list(mooncake.iter_mooncake_records(p, block_size=16))
    assert info.value.code == "KV_TRACE_FORMAT" and "t.jsonl:1: field " in str(info.value)


def test_str_ids_get_equal_codes_and_keep_their_lists():
    from traces.columnar import hash_view

    s = pl.Series("block_hashes", [["a", "b"], ["a", "c"], []], dtype=pl.List(pl.Utf8))
    values, offsets = hash_arrays(s)
    assert offsets.tolist() == [0, 2, 4, 4]
    assert values[0] == values[2] and len(set(values.tolist())) == 3
    assert hash_view(pl.DataFrame({"block_hashes": s})) == [["a", "b"], ["a", "c"], []]
    view = hash_view(pl.DataFrame({"block_hashes": [[5, 6]]}))
    assert isinstance(view, FlatHashes) and view[0] == [5, 6]
