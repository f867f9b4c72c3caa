"""One-pass LRU miss-ratio curve: exact against direct sequential replays."""

from __future__ import annotations

import json
import random

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError
from sim.mrc import lru_mrc
from sim.opt import replay_opt
from sim.replay import replay_sequential
from sim.result import SimResult
from tests._chains import random_chained_chains, table_from_chains
from traces import read_trace


@pytest.fixture(scope="module")
def mooncake():
    return read_trace()


@pytest.fixture(scope="module")
def mooncake_mrc(mooncake):
    return lru_mrc(mooncake)


@pytest.fixture(scope="module")
def synthetic():
    rng = random.Random(20261129)
    chains = random_chained_chains(rng, 400, 12)
    tails = [rng.randint(0, 15) for _ in chains]
    return table_from_chains(chains, tails)


MOONCAKE_CAPS = [1_000, 3_000, 10_000, 30_000, 100_000]


def test_mooncake_shape(mooncake_mrc):
    m = mooncake_mrc
    assert m.max_request_blocks == 373 and m.max_request_blocks <= min(MOONCAKE_CAPS)
    assert m.prefix_chained and m.full_blocks == 117_888 and m.distinct_blocks == 40_148


@pytest.mark.parametrize("capacity", MOONCAKE_CAPS)
def test_mooncake_equals_direct_replay(mooncake, mooncake_mrc, capacity):
    row = mooncake_mrc.hit_ratios([capacity]).row(0, named=True)
    r = replay_sequential(mooncake, capacity, "lru")
    assert row["hit_blocks"] == r.hit_blocks
    assert row["hit_requests"] == int((r.records["hit_blocks"] > 0).sum())
    assert row["exact"] is True
    for col in ("token_hit_ratio", "block_hit_ratio", "request_hit_ratio"):
        assert row[col] == pytest.approx(getattr(r, col), rel=1e-12, abs=0)


def test_mooncake_pinned_figures(mooncake_mrc):
    # the figures pinned for direct replays in test_sim_replay.py
    df = mooncake_mrc.hit_ratios([30_000, 10_000, 1_000, None])
    assert [round(x, 4) for x in df["block_hit_ratio"]] == [0.6476, 0.4492, 0.0880, 0.6594]
    assert [round(x, 4) for x in df["token_hit_ratio"]] == [0.6388, 0.4430, 0.0868, 0.6504]
    assert round(mooncake_mrc.infinite_request_hit_ratio, 4) == 0.4410
    assert mooncake_mrc.infinite()["hit_blocks"] == df["hit_blocks"][3]


def test_synthetic_equals_direct_replay_at_many_capacities(synthetic):
    m = lru_mrc(synthetic)
    assert m.prefix_chained
    lo, hi = m.max_request_blocks, m.distinct_blocks + 1
    caps = sorted({lo, lo + 1, lo + 2, *np.linspace(lo, hi, 12).astype(int).tolist(), hi})
    assert len(caps) >= 5 and m.hit_blocks([lo])[0] < m.infinite_hit_blocks
    got = m.hit_blocks(caps)
    want = [replay_sequential(synthetic, c, "lru").hit_blocks for c in caps]
    assert list(got) == want
    inf = replay_sequential(synthetic, None, "lru")
    assert m.infinite_hit_blocks == inf.hit_blocks
    assert m.infinite_request_hit_ratio == pytest.approx(inf.request_hit_ratio)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), num_requests=st.integers(1, 25), max_new=st.integers(1, 6))
def test_random_chained_traces_equal_direct_replay(seed, num_requests, max_new):
    rng = random.Random(seed)
    chains = random_chained_chains(rng, num_requests, max_new)
    t = table_from_chains(chains, [rng.choice([0, 5]) for _ in chains])
    m = lru_mrc(t)
    caps = list(range(max(1, m.max_request_blocks), m.distinct_blocks + 2))
    direct = [replay_sequential(t, c, "lru") for c in caps]
    assert list(m.hit_blocks(caps)) == [r.hit_blocks for r in direct]
    reqs = [int((r.records["hit_blocks"] > 0).sum()) for r in direct]
    assert list(m.hit_ratios(caps)["hit_requests"]) == reqs
    # the per-capacity SimResults equal the direct replays request for request
    for r, got in zip(direct, m.results(caps)):
        assert got.config["exact"] is True
        assert got.records.select(_RECORD_COLS).equals(r.records.select(_RECORD_COLS))
        assert got.evictions == r.evictions


_RECORD_COLS = [
    "request_id",
    "input_length",
    "full_blocks",
    "hit_blocks",
    "hit_tokens",
    "hit_blocks_gpu",
    "allocated_blocks",
    "evicted_blocks",
    "rejected",
]


@pytest.mark.parametrize("capacity", [373, 3_000, 40_148, None, "10%", "1Mt"])
def test_mooncake_sim_results_equal_direct_replay(mooncake, mooncake_mrc, capacity):
    got = mooncake_mrc.result(capacity)
    want = replay_sequential(mooncake, capacity, "lru")
    assert isinstance(got, SimResult)
    assert got.records.select(_RECORD_COLS).equals(want.records.select(_RECORD_COLS))
    assert got.capacity_blocks == want.capacity_blocks and got.evictions == want.evictions
    for k in ("token_hit_ratio", "block_hit_ratio", "request_hit_ratio", "hit_blocks"):
        assert got[k] == want[k]
    assert got.config["exact"] is True and got.config["capacity"]["blocks"] == got.capacity_blocks
    assert got.mode == "mrc" and got.policy == "lru" and got.clock is None


def test_sim_result_summary_is_plain_json_with_the_shared_names(synthetic, tmp_path):
    m = lru_mrc(synthetic)
    res = m.results([m.max_request_blocks, None])
    seq = replay_sequential(synthetic, m.max_request_blocks, "lru").summary()
    opt = replay_opt(synthetic, m.max_request_blocks).summary()
    for r in res:
        s = r.summary()
        assert json.loads(json.dumps(s)) == s  # plain JSON types only
        assert next(iter(s)) == "token_hit_ratio"
        assert set(opt) <= set(s) <= set(seq)  # OPT's names, all of them the replay's
        assert {k: type(s[k]) for k in s if s[k] is not None} == {
            k: type(seq[k]) for k in s if s[k] is not None
        }
        assert s["clock"] is None  # no clock: no timing fields
        assert r.write(tmp_path / str(r.capacity_blocks)) == [
            "config.json",
            "records.parquet",
            "summary.json",
        ]
    assert res[1].capacity_blocks == m.infinite_capacity_blocks and res[1].evictions == 0


def test_sim_result_below_largest_request_is_flagged_inexact():
    t = table_from_chains([[1, 2], [3, 4, 5], [1, 2]], [0, 0, 0])
    r = lru_mrc(t).result(2)
    assert r.config["exact"] is False
    assert r.records["rejected"].to_list() == [False, True, False]
    assert r.records["allocated_blocks"].to_list() == [2, 0, 2]
    assert min(r.records["evicted_blocks"].to_list()) >= 0
    assert r.num_rejected == replay_sequential(t, 2).num_rejected == 1


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "ten blocks", b"10"])
def test_sim_result_bad_capacity_raises(synthetic, bad):
    m = lru_mrc(synthetic)
    with pytest.raises((KVInvalidInputError, KVConfigError)) as e:
        m.results([100, bad])
    assert e.value.code in {"KV_INVALID_INPUT", "KV_CONFIG_INVALID"}


def test_hand_checkable_depths():
    # same requests as test_sim_replay.test_hand_checkable_trace (block size 512)
    t = table_from_chains([[1, 2], [1, 2, 3], [9], [1, 2, 3]], [0, 64, 0, 0], block_size=512)
    m = lru_mrc(t)
    # stack after request 0: 1 2; after 1: 1 2 3; after 2: 9 1 2 3
    assert list(m.stack_depths) == [-1, -1, 0, 1, -1, -1, 1, 2, 3]
    assert list(m.hit_blocks([3, 4, None])) == [4, 5, 5]
    assert m.max_request_blocks == 3 and m.full_blocks == 9
    assert list(m.breakpoints()) == [1, 2, 3, 4]
    assert replay_sequential(t, 3).hit_blocks == 4 and replay_sequential(t, 4).hit_blocks == 5


def test_below_largest_request_is_an_approximation():
    # at capacity 2 the replay skips request 1 (3 blocks), so request 2 still hits 1 and 2;
    # the one-pass stack puts 3 4 5 above them and counts misses
    t = table_from_chains([[1, 2], [3, 4, 5], [1, 2]], [0, 0, 0])
    m = lru_mrc(t)
    row = m.hit_ratios([2]).row(0, named=True)
    assert row["exact"] is False and row["hit_blocks"] == 0
    assert replay_sequential(t, 2).hit_blocks == 2
    assert m.hit_ratios([3])["exact"][0] is True
    assert m.hit_blocks([3])[0] == replay_sequential(t, 3).hit_blocks == 0
    assert m.hit_blocks([1])[0] == 0  # every request larger than the pool: all misses
    # ... and the other way: the skipped request's blocks are "seen" by the stack
    t = table_from_chains([[1, 2, 3], [1, 2]], [0, 0])
    assert lru_mrc(t).hit_blocks([2])[0] == 2 and replay_sequential(t, 2).hit_blocks == 0


def test_progress_bar_changes_nothing(synthetic, capsys):
    a, b = lru_mrc(synthetic, progress=True), lru_mrc(synthetic)
    assert (a.stack_depths == b.stack_depths).all()
    assert "lru mrc" in capsys.readouterr().err


def test_curve_is_a_monotone_step_function(synthetic):
    m = lru_mrc(synthetic)
    curve = m.curve()
    caps = curve["capacity_blocks"].to_list()
    assert caps == sorted(set(caps)) and caps[0] >= 1
    exact = curve.filter(pl.col("exact"))
    assert (np.diff(exact["hit_blocks"].to_numpy()) > 0).all()  # each breakpoint adds hits
    last = curve.row(-1, named=True)
    assert last["block_hit_ratio"] == m.infinite_block_hit_ratio
    assert last["token_hit_ratio"] == m.infinite_token_hit_ratio
    # between breakpoints the value holds
    mid = [c + 1 for c in caps[:-1] if c + 1 not in set(caps)]
    by_cap = dict(zip(caps, curve["hit_blocks"].to_list()))
    for c, h in zip(mid, m.hit_blocks(mid)):
        assert h == by_cap[c - 1]


def test_columns_and_order(synthetic):
    df = lru_mrc(synthetic).hit_ratios([50, None, 20])
    assert df.columns[:4] == [
        "capacity_blocks",
        "token_hit_ratio",
        "block_hit_ratio",
        "request_hit_ratio",
    ]
    assert df["capacity_blocks"].to_list()[::2] == [50, 20]


def test_non_chained_ids_are_flagged():
    t = table_from_chains([[1, 2], [3, 2]], [0, 0])
    assert lru_mrc(t).prefix_chained is False
    assert lru_mrc(table_from_chains([[1, 2], [1, 3]], [0, 0])).prefix_chained is True


@pytest.mark.parametrize("bad", [0, -3, 1.5, b"10", True, "ten"])
def test_bad_capacity_raises(synthetic, bad):
    m = lru_mrc(synthetic)
    with pytest.raises((KVInvalidInputError, KVConfigError)):
        m.hit_ratios([100, bad])


def test_capacity_text_reads_like_blocks(synthetic):
    m = lru_mrc(synthetic)
    blocks = m.result("10%").capacity_blocks
    assert m.hit_ratios(["10%", "inf"]).equals(m.hit_ratios([blocks, None]))
    assert m.hit_ratios(["50"])["capacity_blocks"].to_list() == [50]


def test_bad_table_raises(synthetic):
    with pytest.raises(KVInvalidInputError, match="block_hashes"):
        lru_mrc(synthetic.drop("block_hashes"))
    with pytest.raises(KVInvalidInputError):
        lru_mrc([1, 2, 3])


def test_empty_trace():
    m = lru_mrc(table_from_chains([], []))
    assert m.full_blocks == 0 and m.max_request_blocks == 0
    df = m.hit_ratios([1, None])
    assert df["block_hit_ratio"].to_list() == [0.0, 0.0]
