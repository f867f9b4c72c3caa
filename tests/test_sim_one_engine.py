"""Issue 12: one event engine, one result type, one set of outputs (and its symptoms)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

from cli.main import cli
from sagellm_kv_cache.errors import KVInvalidInputError, KVInvalidTypeError
from sagellm_kv_cache.eviction import list_policies
from sagellm_kv_cache.pool import KVPool
from sim.config import LinearCostModel
from sim.engine import replay_concurrent
from sim.opt import replay_opt
from sim.replay import replay_sequential
from sim.result import SimResult
from sim.simulate import simulate
from sim.tiered import replay_tiered
from traces import DEFAULT_TRACE, read_trace

TINY = [
    {"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]},
    {"timestamp": 1000, "input_length": 2048, "output_length": 10, "hash_ids": [1, 2, 3, 4]},
    {"timestamp": 2000, "input_length": 512, "output_length": 1, "hash_ids": [9]},
]


@pytest.fixture(scope="module")
def mooncake():
    return read_trace(DEFAULT_TRACE)


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in TINY) + "\n")
    return p


def invoke(*args):
    return CliRunner().invoke(cli, ["replay", *map(str, args), "--no-progress"])


# -- one engine ---------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", sorted(list_policies()))
def test_zero_cost_concurrent_equals_sequential_request_for_request(mooncake, policy):
    seq = replay_sequential(mooncake, 3000, policy)
    con = replay_concurrent(mooncake, 3000, policy, cost=LinearCostModel.zero())
    for col in ("full_blocks", "hit_blocks", "allocated_blocks", "evicted_blocks", "rejected"):
        assert seq.records[col].equals(con.records[col]), col
    assert seq.evictions == con.evictions


def test_every_mode_returns_the_one_result_type(mooncake):
    small = mooncake.head(200)
    results = [
        replay_sequential(small, 500, "lru"),
        replay_concurrent(small, 500, "lru"),
        replay_tiered(small, {"gpu": 300, "cpu": 600}),
        replay_opt(small, 500),
    ]
    for r in results:
        assert isinstance(r, SimResult)
        assert isinstance(r.records, pl.DataFrame) and r.records.height == 200
        s = r.summary()
        assert next(iter(s)) == "token_hit_ratio"
        json.dumps(s)  # plain JSON types only (numpy int64 was the symptom)
        assert {"hit_blocks", "hit_blocks_gpu", "rejected"} <= set(r.records.columns)
    tiered = results[2]
    assert {"hit_blocks_gpu", "hit_blocks_cpu", "queue_s", "prefill_s", "decode_s"} <= set(
        tiered.records.columns
    )


def test_concurrent_records_and_summary_have_every_timing_metric(mooncake):
    r = replay_concurrent(mooncake.head(300), 2000, "lru")
    for col in ("queue_s", "prefill_s", "decode_s", "ttft_s", "tpot_s", "e2e_s", "finish_s"):
        assert col in r.records.columns
    s = r.summary()
    for m in ("ttft", "tpot", "e2e", "queue"):
        for q in ("mean", "p50", "p90", "p99", "max"):
            assert f"{m}_{q}_s" in s
    assert s["clock"] == "simulated" and s["throughput_rps"] > 0
    rec = r.records
    assert (rec["ttft_s"] - rec["queue_s"] - rec["prefill_s"]).abs().max() < 1e-9


def test_python_api_takes_the_same_positional_arguments_and_units(mooncake):
    a = replay_concurrent(mooncake, 2000, "lru")
    b = replay_sequential(mooncake, 2000, "lru")
    assert a.capacity_blocks == b.capacity_blocks == 2000
    r = replay_sequential(mooncake, "40GiB", "lru", model_shape="llama-3-8b")
    assert r.capacity_blocks == 640 and r.config["capacity"]["unit"] == "bytes"
    assert replay_sequential(mooncake, "1024000t").capacity_blocks == 2000
    share = replay_sequential(mooncake, "10%")
    assert share.config["capacity"]["unit"] == "share"


def test_hooks_see_every_request(mooncake):
    class Count:
        def __init__(self):
            self.n = {"arr": 0, "fin": 0}

        def on_arrival(self, i, now):
            self.n["arr"] += 1

        def on_finish(self, i, now):
            self.n["fin"] += 1

    small = mooncake.head(50)
    for mode in ("sequential", "concurrent"):
        c = Count()
        simulate(small, 200, "lru", mode=mode, hooks=(c,))
        assert c.n == {"arr": 50, "fin": 50}


# -- the admission rule, once, as public non-mutating queries ------------------------------------
def test_pool_admission_queries_change_nothing():
    pool = KVPool(num_blocks=4, block_size=2, metadata_only=True)
    h, _ = pool.alloc_with_prefix(block_hashes=[1, 2], num_tokens=4)
    pool.cache_blocks(h)
    pool.free(h)  # blocks of 1, 2 evictable; 2 free
    hit, _ = pool.match_prefix(block_hashes=[1, 2])
    before = (pool.block_pool.num_free, pool.block_pool.num_evictable, pool.get_stats())
    assert pool.obtainable_blocks() == 4
    assert pool.obtainable_blocks(hit) == 2  # taking its hits leaves 2 obtainable
    assert pool.peek_admission(2, hit) is None
    assert pool.peek_admission(3, hit) == "too_large"
    assert pool.peek_admission(4) is None  # 2 free + 2 evictable
    assert pool.peek_admission(5) == "too_large"
    after = (pool.block_pool.num_free, pool.block_pool.num_evictable, pool.get_stats())
    assert before == after
    with pytest.raises(KVInvalidInputError) as err:
        pool.peek_admission(1, [99])
    assert err.value.code == "KV_INVALID_INPUT"
    with pytest.raises(KVInvalidTypeError):
        pool.obtainable_blocks(["a"])
    with pytest.raises((KVInvalidInputError, KVInvalidTypeError)):
        pool.peek_admission(-1)
    assert (pool.block_pool.num_free, pool.block_pool.num_evictable, pool.get_stats()) == after


def test_peek_admission_no_blocks_while_held():
    pool = KVPool(num_blocks=4, block_size=2, metadata_only=True)
    h, _ = pool.alloc_with_prefix(block_hashes=[1, 2, 3], num_tokens=6)
    assert pool.peek_admission(2) == "no_blocks"
    assert pool.obtainable_blocks() == 1
    pool.free(h)
    assert pool.peek_admission(2) is None


# -- CLI symptoms ---------------------------------------------------------------------------------
def test_tiers_print_the_compact_table_and_write_every_file(tmp_path):
    out = tmp_path / "t"
    res = invoke("--tiers", "gpu=2000,cpu=8000", "--model-shape", "llama-3-8b", "--out", out)
    assert res.exit_code == 0, res.output
    assert len(res.output.splitlines()) < 25 and "{" not in res.output
    assert res.output.splitlines()[1].startswith("token_hit_ratio")
    for name in ("config.json", "records.parquet", "summary.json", "ttft.png"):
        assert (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "mooncake" and config["model_shape"] == "llama-3-8b"
    rec = pl.read_parquet(out / "records.parquet")
    assert {"hit_blocks_gpu", "hit_blocks_cpu", "ttft_s"} <= set(rec.columns)


def test_tiers_without_a_model_shape_is_an_error_not_llama(tiny, tmp_path):
    res = invoke(tiny, "--tiers", "gpu=4,cpu=8", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "--model-shape" in res.output
    assert not (tmp_path / "o" / "summary.json").exists()


def test_tiers_honour_max_num_seqs(tiny, tmp_path):
    out = tmp_path / "o"
    args = ("--tiers", "gpu=8,cpu=8", "--model-shape", "llama-3-8b", "--mode", "concurrent")
    res = invoke(tiny, *args, "--max-num-seqs", "1", "--json", "--out", out)
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["peak_running"] == 1 and s["max_num_seqs"] == 1


def test_a_request_larger_than_the_gpu_tier_is_rejected_not_fatal(tiny, tmp_path):
    out = tmp_path / "o"
    res = invoke(tiny, "--tiers", "gpu=3,cpu=8", "--model-shape", "llama-3-8b", "--out", out)
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["num_rejected"] == 1 and s["num_requests"] == 3
    rec = pl.read_parquet(out / "records.parquet")
    assert rec["rejected"].to_list() == [False, True, False]


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_every_mode_writes_the_same_files_and_json(tiny, tmp_path, mode):
    out = tmp_path / mode
    res = invoke(tiny, "--capacity", "4", "--mode", mode, "--json", "--out", out)
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert next(iter(s)) == "token_hit_ratio" and s["mode"] == mode
    assert s == json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "mooncake" and config["format_requested"] == "auto"
    assert config["capacity_unit"] == "blocks"
    for name in ("records.parquet", "hit_ratio_vs_capacity.png"):
        assert (out / name).stat().st_size > 0


def test_request_hit_ratio_is_labelled_and_after_the_token_ratio(tiny, tmp_path):
    res = invoke(tiny, "--capacity", "4", "--out", tmp_path / "o")
    lines = res.output.splitlines()
    tok = next(i for i, x in enumerate(lines) if x.startswith("token_hit_ratio"))
    req = next(i for i, x in enumerate(lines) if x.startswith("request_hit_ratio"))
    assert tok < req and "requests with >= 1 hit block" in lines[req]
