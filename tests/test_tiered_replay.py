"""Replay through tiers: per-tier hit ratios add up to one LRU of the summed size; TTFT model."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from sim.tiered import Link, replay_tiered, ttft_model

BUNDLED = Path(__file__).resolve().parents[1] / "traces" / "data" / "mooncake_synthetic_trace.jsonl"


def mooncake_table() -> pl.DataFrame:
    path = BUNDLED
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pl.DataFrame(
        {
            "request_id": list(range(len(recs))),
            "arrival_s": [r["timestamp"] / 1000 for r in recs],
            "input_length": [r["input_length"] for r in recs],
            "output_length": [r["output_length"] for r in recs],
            "block_hashes": [r["hash_ids"] for r in recs],
            "block_size": [512] * len(recs),
        },
        schema_overrides={"block_hashes": pl.List(pl.Int64)},
    )


def make_table(rows: list[tuple[int, list[int]]], block_size: int = 4) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "request_id": list(range(len(rows))),
            "arrival_s": [float(i) for i in range(len(rows))],
            "input_length": [n for n, _ in rows],
            "output_length": [1] * len(rows),
            "block_hashes": [h for _, h in rows],
            "block_size": [block_size] * len(rows),
        },
        schema_overrides={"block_hashes": pl.List(pl.Int64)},
    )


def test_ttft_model_exact_values():
    assert ttft_model(2.0, 3.0, 1, True) == 5.0
    assert ttft_model(2.0, 3.0, 4, False) == 5.0
    # 4 layers: (2 + 3) / 4 + 3/4 * 3 = 1.25 + 2.25
    assert ttft_model(2.0, 3.0, 4, True) == 3.5
    assert Link(1e9, 1e-3).load_s(2_000_000) == pytest.approx(0.003)
    assert Link(1e9, 1e-3).load_s(0) == 0.0


def test_small_trace_per_tier_hits_exact(tmp_path):
    # device 2 blocks, cpu 2 blocks, block size 4; requests of 2 full blocks each
    table = make_table([(8, [1, 2]), (8, [3, 4]), (8, [1, 2]), (8, [5, 6]), (8, [3, 4])])
    s = replay_tiered(table, {"gpu": 2, "cpu": 2}, None, tmp_path)
    # r0 miss; r1 miss (r0 -> cpu); r2 cpu hit x2 (r1 -> cpu); r3 miss (r2 -> cpu, r1 dropped)
    # r4 miss
    assert s["per_tier"]["gpu"]["hit_blocks"] == 0
    assert s["per_tier"]["cpu"]["hit_blocks"] == 2
    assert s["block_hit_ratio"] == 2 / 10
    single = replay_tiered(table, {"gpu": 4}, None, None)
    assert single["block_hit_ratio"] == s["block_hit_ratio"]
    assert (tmp_path / "summary.json").exists() and (tmp_path / "ttft.png").stat().st_size > 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["per_tier"]["cpu"]["hit_blocks"] == 2


def test_mooncake_two_lru_tiers_add_up_to_one_lru_of_both(tmp_path):
    table = mooncake_table()
    tiered = replay_tiered(table, {"gpu": 2000, "cpu": 8000}, None, tmp_path)
    single = replay_tiered(table, {"gpu": 10000}, None, None)
    per = tiered["per_tier"]
    # exact, not approximate: the exclusive LRU chain evicts what one LRU of 10,000 would
    assert (
        per["gpu"]["hit_blocks"] + per["cpu"]["hit_blocks"]
        == single["per_tier"]["gpu"]["hit_blocks"]
    )
    assert tiered["block_hit_ratio"] == single["block_hit_ratio"]
    assert tiered["token_hit_ratio"] == single["token_hit_ratio"]
    assert round(single["block_hit_ratio"], 4) == 0.4492
    assert round(single["token_hit_ratio"], 4) == 0.4430
    assert round(per["gpu"]["block_hit_ratio"], 4) == 0.1548
    assert round(per["cpu"]["block_hit_ratio"], 4) == 0.2943
    # the gpu tier alone behaves as an LRU of 2,000 (LRU's inclusion property)
    assert tiered["ttft_device_only"]["block_hit_ratio"] == per["gpu"]["block_hit_ratio"]
    # loading from the cpu tier beats recomputing those tokens
    assert tiered["ttft"]["total_s"] < tiered["ttft_device_only"]["total_s"]
    assert tiered["ttft_device_only"]["total_s"] < tiered["ttft_recompute"]["total_s"]
    assert tiered["time_saved_s"] > 0
    assert (tmp_path / "ttft.png").stat().st_size > 0


def test_replay_reads_replay_config_field_names():
    class Cost:
        prefill_s_per_token = 1e-3
        decode_s_per_token = 0.5

    class Config:
        mode = "concurrent"
        block_size = 4
        policy = "lru"
        model_shape = "tiny"
        cost = Cost()

    table = make_table([(8, [1, 2]), (8, [1, 2])])
    s = replay_tiered(table, {"gpu": 4, "cpu": 4}, Config(), None)
    assert s["config"]["sequential"] is False
    assert s["config"]["prefill_tps"] == 1000.0
    assert s["config"]["model"] == "tiny"
    # request 0 finishes at 0.008 + 0.5 s, before request 1 arrives (1 s): its blocks are
    # cached on the device and request 1 hits both
    assert s["per_tier"]["gpu"]["hit_blocks"] == 2
