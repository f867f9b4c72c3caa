"""AccessStatsCollector: seed snippet, hand-checked summaries, reuse distance, round trips."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVInvalidInputError, KVTraceFormatError
from sagellm_kv_cache.profiling import (
    TIME_WINDOWS,
    AccessEvent,
    AccessStatsCollector,
    AccessStatsHook,
)
from sagellm_kv_cache.profiling.reuse import previous_access_index, reuse_distances


def make_collector(seq: str = "ABACBA", hits: str = "001011", **kwargs) -> AccessStatsCollector:
    """A collector fed ``seq`` (one char per block) at t = 0, 1, 2, ... seconds."""
    c = AccessStatsCollector(**kwargs)
    for t, (b, h) in enumerate(zip(seq, hits)):
        c.record_access(b, h == "1", timestamp=float(t), position=t % 3, request_id=f"r{t // 2}")
    return c


def brute_force_reuse(seq: list) -> list[int]:
    out = []
    for i, b in enumerate(seq):
        prev = max((j for j in range(i) if seq[j] == b), default=None)
        out.append(-1 if prev is None else len(set(seq[prev + 1 : i])))
    return out


# --------------------------------------------------------------------- seed
def test_seed_snippet_prints_what_the_page_says(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    collector = AccessStatsCollector()
    collector.record_access("block_001", is_hit=True)
    collector.record_access("block_002", is_hit=False)
    collector.export_stats("stats.json")
    summary = collector.get_stats_summary()
    print(f"Hit rate: {summary['hit_rate']:.2%}")
    print(f"Total accesses: {summary['total_accesses']}")
    assert capsys.readouterr().out == "Hit rate: 50.00%\nTotal accesses: 2\n"
    assert (tmp_path / "stats.json").is_file()


# --------------------------------------------------------------------- summary
def test_summary_of_a_hand_checked_sequence():
    s = make_collector().get_stats_summary()
    assert (s["total_accesses"], s["hits"], s["misses"], s["hit_rate"]) == (6, 3, 3, 0.5)
    assert s["unique_blocks"] == 3
    assert s["unique_requests"] == 3
    assert (s["start_s"], s["end_s"], s["duration_s"]) == (0.0, 5.0, 5.0)
    # A@2 saw {B}; B@4 saw {A, C}; A@5 saw {C, B}
    rd = s["reuse_distance"]
    assert (rd["count"], rd["cold"]) == (3, 3)
    assert rd["mean"] == pytest.approx(5 / 3)
    assert rd["histogram"] == {"bin_lo": [0, 1, 2], "bin_hi": [0, 1, 3], "count": [0, 1, 2]}
    # reuse times: A 0->2, B 1->4, A 2->5
    assert s["reuse_time_s"]["mean"] == pytest.approx((2 + 3 + 3) / 3)
    assert s["reuse_time_s"]["percentiles"]["p50"] == 3.0
    assert s["hottest_blocks"] == [
        {"block_id": "A", "accesses": 3, "hits": 2},
        {"block_id": "B", "accesses": 2, "hits": 1},
        {"block_id": "C", "accesses": 1, "hits": 0},
    ]
    # positions t % 3 = 0 1 2 0 1 2; hits at t = 2, 4, 5
    assert s["hit_rate_by_position"] == [
        {
            "bucket": "0",
            "position_lo": 0,
            "position_hi": 0,
            "accesses": 2,
            "hits": 0,
            "hit_rate": 0.0,
        },
        {
            "bucket": "1",
            "position_lo": 1,
            "position_hi": 1,
            "accesses": 2,
            "hits": 1,
            "hit_rate": 0.5,
        },
        {
            "bucket": "2-3",
            "position_lo": 2,
            "position_hi": 3,
            "accesses": 2,
            "hits": 2,
            "hit_rate": 1.0,
        },
    ]


def test_time_windows_count_accesses_and_hits_per_window():
    c = make_collector(time_windows={"2s": 2.0, "10s": 10.0})
    w = c.get_stats_summary()["time_windows"]
    assert set(w) == {"2s", "10s"}
    # t = 0..5 -> windows [0,2) [2,4) [4,6); hits at t = 2, 4, 5
    assert w["2s"] == {
        "window_s": 2.0,
        "num_windows": 3,
        "start_s": [0.0, 2.0, 4.0],
        "accesses": [2, 2, 2],
        "hits": [0, 1, 2],
        "hit_rate": [0.0, 0.5, 1.0],
    }
    assert w["10s"]["accesses"] == [6]
    assert set(AccessStatsCollector().get_stats_summary()["time_windows"]) == set(TIME_WINDOWS)


def test_empty_collector_summarises_to_zeros():
    s = AccessStatsCollector().get_stats_summary()
    assert (s["total_accesses"], s["hits"], s["misses"], s["hit_rate"], s["unique_blocks"]) == (
        0,
        0,
        0,
        0.0,
        0,
    )
    assert s["duration_s"] == 0.0
    assert s["hottest_blocks"] == [] and s["hit_rate_by_position"] == []
    assert s["reuse_distance"]["count"] == 0
    assert all(w["num_windows"] == 0 for w in s["time_windows"].values())


def test_default_timestamps_come_from_the_clock_relative_to_start():
    now = iter([100.0, 100.5, 102.0])
    c = AccessStatsCollector(clock=lambda: next(now))
    c.record_access(1)
    c.record_access(2, True)
    assert [e.timestamp for e in c.iter_events()] == [0.5, 2.0]


def test_block_ids_of_every_kind_are_interned_and_kept():
    c = AccessStatsCollector()
    c.record_access("x", timestamp=0.0)
    c.record_access(7, timestamp=1.0)
    c.record_access(b"\x01\x02", True, timestamp=2.0, tier="cpu", size_bytes=4096)
    c.record_access("x", True, timestamp=3.0)
    events = list(c.iter_events())
    assert [e.block_id for e in events] == ["x", 7, b"\x01\x02", "x"]
    assert events[2] == AccessEvent(b"\x01\x02", 2.0, True, None, None, "cpu", 4096)
    assert c.block_id_type == "mixed"
    assert c.get_stats_summary()["unique_blocks"] == 3


def test_record_many_matches_record_access():
    one = AccessStatsCollector()
    many = AccessStatsCollector()
    ids = [3, 1, 3, 2]
    hits = [False, False, True, False]
    for i, (b, h) in enumerate(zip(ids, hits)):
        one.record_access(
            b, h, timestamp=1.5, request_id="r", position=i, tier="gpu", size_bytes=64
        )
    many.record_many(
        np.asarray(ids),
        np.asarray(hits),
        timestamps=1.5,
        request_ids="r",
        positions=range(4),
        tiers="gpu",
        size_bytes=64,
    )
    assert list(one.iter_events()) == list(many.iter_events())
    assert one.to_polars().equals(many.to_polars())
    with pytest.raises(KVInvalidInputError, match="positions has 2 entries"):
        many.record_many([1, 2, 3], False, positions=[0, 1])


def test_reset_clears_everything_and_keeps_working():
    c = make_collector()
    record = c.record_access  # a reference taken before reset stays valid
    c.record_eviction("A", "capacity", timestamp=9.0)
    c.reset()
    assert len(c) == 0 and c.num_evictions == 0
    assert c.get_stats_summary()["total_accesses"] == 0
    record("Z", True, timestamp=0.0)
    assert [e.block_id for e in c.iter_events()] == ["Z"]


def test_concurrent_appends_keep_rows_whole():
    c = AccessStatsCollector()

    def work(k: int) -> None:
        for i in range(5000):
            c.record_access(k, i % 2 == 0, timestamp=float(k), position=k, request_id=f"t{k}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    df = c.to_polars()
    assert df.height == 20_000
    # every field of a row comes from the same call
    assert df.filter(
        (pl.col("block_id") != pl.col("position"))
        | (pl.col("timestamp") != pl.col("position").cast(pl.Float64))
        | (pl.col("request_id") != pl.lit("t") + pl.col("position").cast(pl.String))
    ).is_empty()


def test_class_level_call_reaches_the_specialised_path():
    c = AccessStatsCollector()
    AccessStatsCollector.record_access(c, "b", True, timestamp=1.0)
    assert len(c) == 1
    assert "Record one access" in c.record_access.__doc__


# --------------------------------------------------------------------- reuse distance
def test_reuse_distances_of_the_worked_example():
    codes = np.array([0, 1, 0, 2, 1, 0])
    assert previous_access_index(codes).tolist() == [-1, -1, 0, -1, 1, 2]
    assert reuse_distances(codes).tolist() == [-1, -1, 1, -1, 2, 2]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=8), max_size=60))
def test_reuse_distances_match_brute_force(seq):
    assert reuse_distances(np.asarray(seq, dtype=np.int64)).tolist() == brute_force_reuse(seq)


# --------------------------------------------------------------------- tables
def test_to_polars_columns_and_dtypes():
    df = make_collector().to_polars()
    assert df.schema == pl.Schema(
        {
            "timestamp": pl.Float64,
            "block_id": pl.String,
            "block_code": pl.Int64,
            "is_hit": pl.Boolean,
            "request_id": pl.String,
            "position": pl.Int64,
            "tier": pl.String,
            "size_bytes": pl.Int64,
        }
    )
    assert df["block_id"].to_list() == list("ABACBA")
    assert df["block_code"].to_list() == [0, 1, 0, 2, 1, 0]
    assert df["tier"].null_count() == 6


def test_int_block_ids_give_an_int_column():
    c = AccessStatsCollector()
    c.record_many([5, 6, 5], [False, False, True], timestamps=[0.0, 1.0, 2.0])
    assert c.to_polars()["block_id"].dtype == pl.Int64


def test_to_pandas_columns_and_dtypes():
    df = make_collector().to_pandas()
    assert list(df.columns) == [
        "timestamp",
        "block_id",
        "block_code",
        "is_hit",
        "request_id",
        "position",
        "tier",
        "size_bytes",
    ]
    assert df["timestamp"].dtype == np.float64
    assert df["is_hit"].dtype == bool
    assert df["position"].dtype == pd.Int64Dtype()
    assert df["size_bytes"].isna().all()
    assert df["block_id"].tolist() == list("ABACBA")


# --------------------------------------------------------------------- export / load
@pytest.mark.parametrize("suffix", [".json", ".parquet"])
@pytest.mark.parametrize("ids", [["a", "b", "a"], [10, 20, 10], [b"\xaa", b"\xbb", b"\xaa"]])
def test_export_load_round_trip(tmp_path, suffix, ids):
    c = AccessStatsCollector(time_windows={"5s": 5.0})
    c.record_many(
        ids,
        [False, False, True],
        timestamps=[0.0, 1.0, 7.0],
        request_ids=["r1", None, "r2"],
        positions=[0, 1, 0],
    )
    c.record_access(ids[1], True, timestamp=8.0, tier="cpu", size_bytes=128)
    c.record_eviction(ids[0], "capacity", timestamp=9.0, block_hash=b"\x01")
    path = c.export_stats(tmp_path / f"stats{suffix}")
    back = AccessStatsCollector.load(path)
    assert list(back.iter_events()) == list(c.iter_events())
    assert back.to_polars().equals(c.to_polars())
    assert back.time_windows == {"5s": 5.0}
    assert [(e.block_id, e.reason, e.timestamp) for e in back.iter_evictions()] == [
        (ids[0], "capacity", 9.0)
    ]
    assert back.get_stats_summary() == c.get_stats_summary()


def test_json_export_layout(tmp_path):
    doc = json.loads(make_collector().export_stats(tmp_path / "s.json").read_text())
    assert doc["version"] == 1 and doc["format"] == "sagellm-kv-access-stats"
    assert set(doc) >= {"summary", "time_windows", "accesses", "evictions", "block_id_type"}
    columns = "block_id timestamp is_hit request_id position tier size_bytes"
    assert set(doc["accesses"]) == set(columns.split())
    assert doc["accesses"]["block_id"] == list("ABACBA")
    assert doc["accesses"]["tier"] == [None] * 6
    assert doc["summary"]["hit_rate"] == 0.5
    assert doc["time_windows"]["1s"]["accesses"] == [1] * 6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"version": 2, "accesses": {}}', "'version'"),
        ('{"version": 1}', "'accesses'"),
        ('{"version": 1, "accesses": {"block_id": [1], "timestamp": [0.0]}}', "accesses.is_hit"),
        (
            '{"version": 1, "accesses": {"block_id": [1, 2], "timestamp": [0.0], "is_hit": [true, false]}}',
            "has 1 entries",
        ),
        (
            '{"version": 1, "accesses": {"block_id": [[1]], "timestamp": [0.0], "is_hit": [true]}}',
            "block id",
        ),
    ],
)
def test_malformed_json_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(KVTraceFormatError, match=message) as err:
        AccessStatsCollector.load(path)
    assert "broken.json" in str(err.value)


def test_load_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        AccessStatsCollector.load(tmp_path / "nope.json")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(KVTraceFormatError, match=r"bad\.parquet"):
        AccessStatsCollector.load(tmp_path / "bad.parquet")
    with pytest.raises(KVInvalidInputError, match=r"\.csv"):
        make_collector().export_stats(tmp_path / "s.csv")


# --------------------------------------------------------------------- hook
def test_hook_records_lookups_and_evictions_from_a_real_pool():
    from tests.conftest import make_pool

    pool = make_pool(num_blocks=6, block_size=4)
    hook = AccessStatsHook(tier="gpu")
    pool.add_hook(hook)
    tokens = list(range(12))  # 3 blocks
    h1, _ = pool.alloc_with_prefix(tokens, request_id="r1")
    pool.cache_blocks(h1)
    pool.free(h1)
    h2, hit_tokens = pool.alloc_with_prefix(tokens + list(range(100, 104)), request_id="r2")
    assert hit_tokens == 12
    pool.free(h2)
    events = list(hook.collector.iter_events())
    assert [(e.request_id, e.position, e.is_hit) for e in events] == [
        ("r1", 0, False),
        ("r1", 1, False),
        ("r1", 2, False),
        ("r2", 0, True),
        ("r2", 1, True),
        ("r2", 2, True),
        ("r2", 3, False),
    ]
    assert [e.block_id for e in events[3:6]] == list(h1.block_ids)
    assert [e.block_id for e in events[3:]] == list(h2.block_ids)
    assert {e.tier for e in events} == {"gpu"}
    evicted = pool.evict(2)
    assert [e.block_id for e in hook.collector.iter_evictions()] == evicted
    assert hook.collector.get_stats_summary()["evictions"]["total"] == len(evicted)


def test_hook_on_lookup_direct_call():
    hook = AccessStatsHook()
    hook.on_lookup("q", [7, 8, 9], 1, 3, 4.0)
    assert [
        (e.block_id, e.is_hit, e.position, e.timestamp) for e in hook.collector.iter_events()
    ] == [
        (7, True, 0, 4.0),
        (8, False, 1, 4.0),
        (9, False, 2, 4.0),
    ]
    hook.on_evict(7, b"\x00", "capacity", 5.0)
    assert hook.collector.get_stats_summary()["evictions"] == {
        "total": 1,
        "by_reason": {"capacity": 1},
    }


def test_record_many_of_a_large_int_array_interns_in_first_seen_order():
    ids = np.arange(6000, dtype=np.int64)[::-1] % 5000  # 4999..0, then 4999..4000 again
    c = AccessStatsCollector()
    c.record_many(ids, False, timestamps=0.0)
    df = c.to_polars()
    assert df["block_id"].to_list() == ids.tolist()
    assert df["block_code"].to_list()[:3] == [0, 1, 2]
    assert c.get_stats_summary()["unique_blocks"] == 5000


# ------------------------------------------------------- bounded memory (issue 11, 15 and 16)
def _drive_pool_with_hook(hook, passes: int = 3) -> None:
    """Each pass: 60 requests over 12 prompts on a 16-block pool (hits, misses, evictions)."""
    from sagellm_kv_cache import KVPool

    pool = KVPool(num_blocks=16, block_size=4)
    pool.add_hook(hook)
    for p in range(passes):
        for i in range(60):
            hashes = [b"p%d-%d" % (i % 12, k) for k in range(1 + i % 5)]
            h, _ = pool.alloc_with_prefix(
                block_hashes=hashes, num_tokens=4 * len(hashes), request_id=f"r{p}-{i}"
            )
            pool.cache_blocks(h)
            pool.free(h)


def test_hook_memory_is_bounded_and_the_summary_exact(tmp_path):
    unbounded = AccessStatsHook(max_records_in_memory=None)
    bounded = AccessStatsHook(max_records_in_memory=50, spill_dir=tmp_path)
    peak = 0
    for hook in (unbounded, bounded):
        _drive_pool_with_hook(hook)
    for _ in range(4):  # more passes: memory held stays under the bound after each
        _drive_pool_with_hook(bounded, passes=1)
        _drive_pool_with_hook(unbounded, passes=1)
        len(bounded.collector)  # records queued calls (and spills)
        peak = max(peak, bounded.collector.records_in_memory)
    assert peak <= 50
    len(unbounded.collector)
    assert unbounded.collector.records_in_memory > 1000  # the defect: it only grows
    a, b = unbounded.collector, bounded.collector
    assert len(a) == len(b) and a.num_evictions == b.num_evictions > 0
    sa, sb = a.get_stats_summary(), b.get_stats_summary()
    for key in ("total_accesses", "hits", "misses", "unique_blocks", "reuse_distance", "evictions"):
        assert sa[key] == sb[key], key
    assert a.to_polars().drop("timestamp").equals(b.to_polars().drop("timestamp"))
    assert (
        list(a.iter_evictions())[-3:][0].block_hash == list(b.iter_evictions())[-3:][0].block_hash
    )
    spill_dir = b.spill_directory
    assert spill_dir is not None and spill_dir.parent == tmp_path and any(spill_dir.iterdir())
    b.reset()
    assert len(b) == 0 and b.num_evictions == 0 and not spill_dir.exists()


def test_spilled_collector_round_trips_every_kind_of_id(tmp_path):
    c = AccessStatsCollector(max_records_in_memory=3, spill_dir=tmp_path)
    ref = AccessStatsCollector()
    for coll in (c, ref):
        for t, b in enumerate(["a", 7, b"\x01", "a", 7, b"\x01", "z"]):
            coll.record_access(b, t % 2 == 0, timestamp=float(t), request_id=t, tier="gpu")
        coll.record_eviction(7, "capacity", timestamp=9.0, block_hash=2**70)
        coll.record_eviction("a", "explicit", timestamp=9.5, block_hash=b"\xff")
        coll.record_evictions([b"\x01", "z"], timestamp=10.0, block_hashes=[None, 5])
    assert c.records_in_memory <= 3
    assert list(c.iter_events()) == list(ref.iter_events())
    assert list(c.iter_evictions()) == list(ref.iter_evictions())
    assert c.get_stats_summary() == ref.get_stats_summary()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_max_records_in_memory_must_be_a_positive_int(bad):
    with pytest.raises(KVInvalidInputError) as info:
        AccessStatsCollector(max_records_in_memory=bad)
    assert info.value.code == "KV_INVALID_INPUT"


def test_group_order_does_not_overflow_for_large_keys():
    # prefix * m would pass 2**63 here (as with ~3e9 accesses): the order must stay exact
    from sagellm_kv_cache.profiling.reuse import _group_order

    prefix = np.array([2**61, 3, 2**61, 3, 2**60], dtype=np.int64)
    assert _group_order(prefix, len(prefix)).tolist() == [1, 3, 4, 0, 2]
    small = np.array([5, 3, 5, 3, 4], dtype=np.int64)  # the fast path gives the same order
    assert _group_order(small, len(small)).tolist() == [1, 3, 4, 0, 2]


def test_removed_before_counts_exactly_with_values_near_int64():
    # reuse_distances' dominance count, fed previous indices large enough that the old
    # combined sort key overflowed; compared with an O(m^2) count
    from sagellm_kv_cache.profiling.reuse import _removed_before

    rng = np.random.default_rng(3)
    # distinct, sharing their high bits (so groups are large where the key overflows);
    # 100 reuses: not a power of two, so a wrapped key no longer ends in the index
    v = (2**62 + rng.permutation(100)).astype(np.int64)
    expected = [int(np.sum(v[:k] < v[k])) for k in range(len(v))]
    assert _removed_before(v, 0).tolist() == expected
