"""Sequential replay of the bundled Mooncake trace: the pinned hit ratios, and bad traces."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from sagellm_kv_cache.errors import KVTraceFormatError
from sim.replay import replay_sequential
from traces import DEFAULT_TRACE, read_trace


@pytest.fixture(scope="module")
def mooncake():
    return read_trace(DEFAULT_TRACE)


def test_bundled_trace_reads_whole(mooncake):
    assert mooncake.height == 3993
    first = mooncake.row(0, named=True)
    assert (first["arrival_s"], first["input_length"], first["block_size"]) == (0.0, 40160, 512)
    assert len(first["block_hashes"]) == 79


@pytest.mark.parametrize(
    "capacity,block,token,req",
    [
        (None, 0.6594, 0.6504, 0.4410),
        (30_000, 0.6476, 0.6388, None),
        (10_000, 0.4492, 0.4430, None),
        (1_000, 0.0880, 0.0868, None),
    ],
)
def test_pinned_hit_ratios(mooncake, capacity, block, token, req):
    r = replay_sequential(mooncake, capacity)
    assert round(r.block_hit_ratio, 4) == block
    assert round(r.token_hit_ratio, 4) == token
    if req is not None:
        assert round(r.request_hit_ratio, 4) == req


def test_hand_checkable_trace(tmp_path):
    lines = [
        {"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [1, 2]},
        {
            "timestamp": 1,
            "input_length": 1600,
            "output_length": 1,
            "hash_ids": [1, 2, 3, 4],
        },  # 3 full blocks
        {"timestamp": 2, "input_length": 512, "output_length": 1, "hash_ids": [9]},
        {"timestamp": 3, "input_length": 1536, "output_length": 1, "hash_ids": [1, 2, 3]},
    ]
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines))
    t = read_trace(p)
    r = replay_sequential(t, 3)  # capacity 3: request 3 evicts block 3 (LRU tail-first)
    assert list(r.records["hit_blocks"]) == [0, 2, 0, 2]
    assert list(r.records["full_blocks"]) == [2, 3, 1, 3]
    assert r.hit_blocks == 4 and r.full_blocks == 9
    assert r.token_hit_ratio == 4 * 512 / (1024 + 1600 + 512 + 1536)


BAD = [
    ('{"timestamp": 0, "input_length": 10', "<json>"),
    ('{"input_length": 10, "output_length": 1, "hash_ids": [1]}', "timestamp"),
    ('{"timestamp": 0, "output_length": 1, "hash_ids": [1]}', "input_length"),
    ('{"timestamp": 0, "input_length": -5, "output_length": 1, "hash_ids": [1]}', "input_length"),
    ('{"timestamp": 0, "input_length": 1500, "output_length": 1, "hash_ids": [1, 2]}', "hash_ids"),
    (
        '{"timestamp": 0, "input_length": 10, "output_length": "a", "hash_ids": [1]}',
        "output_length",
    ),
]


@pytest.mark.parametrize("bad,field", BAD)
def test_malformed_record_names_file_line_and_field(tmp_path, bad, field):
    p = tmp_path / "bad.jsonl"
    good = '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}'
    p.write_text(good + "\n" + bad + "\n")
    with pytest.raises(KVTraceFormatError) as err:
        read_trace(p)
    assert f"bad.jsonl:2: field '{field}'" in str(err.value)
    stats: dict = {}
    assert read_trace(p, skip_bad=True, stats=stats).height == 1 and stats["skipped"] == 1


def test_unsorted_timestamps(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_text(
        '{"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n'
        '{"timestamp": 4, "input_length": 10, "output_length": 1, "hash_ids": [2]}\n'
    )
    with pytest.raises(KVTraceFormatError, match=r"u.jsonl:2: field 'timestamp'.*unsorted"):
        read_trace(p)


def test_cli_replay_writes_outputs(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        cli,
        [
            "replay",
            "--capacity",
            "1000",
            "--curve",
            "1000,10000",
            "--no-progress",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "token_hit_ratio      0.0868" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert round(summary["block_hit_ratio"], 4) == 0.0880
    assert {r["capacity_blocks"] for r in summary["curve"] if r["policy"] == "lru"} == {1000, 10000}
    for name in ("config.json", "records.parquet", "hit_ratio_vs_capacity.png"):
        assert (out / name).stat().st_size > 0


def test_cli_replay_errors_name_the_file(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"timestamp": 0}\n')
    res = CliRunner().invoke(cli, ["replay", str(p), "--no-progress", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "broken.jsonl:1" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["replay", str(tmp_path / "missing.jsonl"), "--no-progress"])
    assert res.exit_code != 0 and "missing.jsonl" in res.output


def test_every_command_has_help_with_examples():
    for name in cli.commands:
        res = CliRunner().invoke(cli, [name, "--help"])
        assert res.exit_code == 0 and "Example" in res.output, name


def test_cli_tiered_replay_sums_to_one_pool(tmp_path):
    out = tmp_path / "tiers"
    res = CliRunner().invoke(
        cli,
        [
            "replay",
            "--tiers",
            "gpu=2000,cpu=8000",
            "--model-shape",
            "llama-3-8b",
            "--no-progress",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    per = summary["per_tier"]
    assert per["gpu"]["hit_blocks"] + per["cpu"]["hit_blocks"] == 18254 + 34696
    assert round(per["gpu"]["block_hit_ratio"] + per["cpu"]["block_hit_ratio"], 4) == 0.4492
    assert (out / "ttft.png").stat().st_size > 0
    bad = CliRunner().invoke(cli, ["replay", "--tiers", "gpu=lots", "--out", str(out)])
    assert bad.exit_code == 2 and "--tiers" in bad.output
