"""``sage-kv-stats replay`` in both modes on a tiny trace file: files, exact numbers, errors."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

from cli.main import cli
from sagellm_kv_cache.eviction import list_policies

# four requests, 512-token blocks:
#   r1 t=0 [1,2]      r2 t=1 [1,2,3,(4)]      r3 t=2 [9]      r4 t=3 [1,2,3]
TINY = [
    {"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]},
    {"timestamp": 1000, "input_length": 1600, "output_length": 10, "hash_ids": [1, 2, 3, 4]},
    {"timestamp": 2000, "input_length": 512, "output_length": 1, "hash_ids": [9]},
    {"timestamp": 3000, "input_length": 1536, "output_length": 1, "hash_ids": [1, 2, 3]},
]
PROMPT_TOKENS = 1024 + 1600 + 512 + 1536
COST = "prefill_s_per_token=0,prefill_overhead_s=0.5,decode_s_per_token=0.25"


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in TINY) + "\n")
    return p


def invoke(*args):
    return CliRunner().invoke(cli, ["replay", *map(str, args), "--no-progress"])


def test_sequential_mode_on_a_tiny_trace(tiny, tmp_path):
    out = tmp_path / "seq"
    res = invoke(tiny, "--capacity", "1536t", "--curve", "1,3,10", "--out", out)
    assert res.exit_code == 0, res.output
    assert "capacity (blocks)    3" in res.output and "policy lru" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "sequential"
    assert (summary["hit_blocks"], summary["full_blocks"], summary["evictions"]) == (4, 9, 2)
    assert summary["token_hit_ratio"] == 4 * 512 / PROMPT_TOKENS
    assert [r["capacity_blocks"] for r in summary["curve"]] == [1, 3, 10, 5]  # + infinite
    config = json.loads((out / "config.json").read_text())
    assert (config["capacity"], config["capacity_blocks"], config["mode"]) == (
        "1536t",
        3,
        "sequential",
    )
    assert config["curve_capacities"] == [1, 3, 10] and config["block_size"] == 512
    rec = pl.read_parquet(out / "records.parquet")
    assert rec["hit_blocks"].to_list() == [0, 2, 0, 2]
    assert (out / "hit_ratio_vs_capacity.png").stat().st_size > 0
    assert not (out / "queue_ttft.png").exists()


def test_concurrent_mode_on_a_tiny_trace(tiny, tmp_path):
    # r1 runs 0 -> 0.5 -> 3; r2 hits r1's cached blocks in use, 1 -> 1.5 -> 4; the 3 blocks
    # are all in use, so r3 (t=2) waits for r2's release at 4 (evicting hash 3) and r4 (t=3)
    # waits behind it; r4 hits 1,2 but needs a block: it starts when r3 ends at 4.75.
    out = tmp_path / "con"
    res = invoke(
        tiny, "--mode", "concurrent", "--capacity", "3", "--cost-model", COST,
        "--curve", "3", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "rejected 0" in res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "concurrent"
    assert (s["hit_blocks"], s["full_blocks"], s["evictions"], s["num_rejected"]) == (4, 9, 2, 0)
    assert s["token_hit_ratio"] == 4 * 512 / PROMPT_TOKENS
    assert (s["peak_blocks_in_use"], s["peak_running"], s["peak_waiting"]) == (3, 2, 2)
    assert s["makespan_s"] == 5.5
    assert (s["queue_mean_s"], s["queue_p50_s"], s["queue_max_s"]) == (0.9375, 0.875, 2.0)
    assert (s["ttft_mean_s"], s["ttft_max_s"]) == (1.4375, 2.5)
    rec = pl.read_parquet(out / "records.parquet")
    assert rec["start_s"].to_list() == [0.0, 1.0, 4.0, 4.75]
    assert rec["finish_s"].to_list() == [3.0, 4.0, 4.75, 5.5]
    assert rec["hit_blocks"].to_list() == [0, 2, 0, 2]
    assert rec["evicted_blocks"].to_list() == [0, 0, 1, 1]
    config = json.loads((out / "config.json").read_text())
    assert config["cost"] == {
        "prefill_s_per_token": 0.0,
        "prefill_overhead_s": 0.5,
        "decode_s_per_token": 0.25,
        "decode_overhead_s": 0.0,
    }
    assert config["mode"] == "concurrent" and config["max_num_seqs"] is None
    tl = pl.read_parquet(out / "timeline.parquet")
    assert tl["waiting"].max() == 2
    for name in ("queue_ttft.png", "hit_ratio_vs_capacity.png"):
        assert (out / name).stat().st_size > 0


def test_concurrent_max_num_seqs_and_rejection(tiny, tmp_path):
    out = tmp_path / "lim"
    res = invoke(
        tiny, "--mode", "concurrent", "--capacity", "1024t", "--max-num-seqs", "1",
        "--cost-model", COST, "--curve", "2", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["capacity_blocks"] == 2 and s["num_rejected"] == 2  # r2 and r4 need 3 blocks
    assert s["max_num_seqs"] == 1 and s["peak_running"] == 1
    rec = pl.read_parquet(out / "records.parquet")
    assert rec["rejected"].to_list() == [False, True, False, True]
    assert rec["start_s"].to_list()[::2] == [0.0, 3.0]  # r3 waits for r1 (one seq at a time)


def test_zero_cost_concurrent_equals_sequential_on_the_bundled_trace(tmp_path):
    seq, con = tmp_path / "s", tmp_path / "c"
    common = ["--capacity", "3000", "--curve", "1000"]
    assert invoke(*common, "--out", seq).exit_code == 0
    zero = "prefill_overhead_s=0,prefill_s_per_token=0,decode_s_per_token=0"
    res = invoke(*common, "--mode", "concurrent", "--cost-model", zero, "--out", con)
    assert res.exit_code == 0, res.output
    a = json.loads((seq / "summary.json").read_text())
    b = json.loads((con / "summary.json").read_text())
    for k in ("hit_blocks", "full_blocks", "evictions", "token_hit_ratio", "request_hit_ratio"):
        assert a[k] == b[k], k


def test_byte_capacity_with_a_model_shape(tiny, tmp_path):
    out = tmp_path / "bytes"
    res = invoke(
        tiny, "--capacity", "40GiB", "--model-shape", "llama-3-8b", "--curve", "2", "--out", out
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["capacity_blocks"] == 640  # 64 MiB/block


@pytest.mark.parametrize(
    "args,option,words",
    [
        (["--capacity", "lots"], "--capacity", "cannot parse capacity"),
        (["--capacity", "0"], "--capacity", "positive"),
        (["--capacity", "40GiB"], "--capacity", "--model-shape"),
        (["--capacity", "100t"], "--capacity", "no full block"),
        (["--cost-model", "prefill=1"], "--cost-model", "bad cost model item"),
        (["--cost-model", "decode_s_per_token=fast"], "--cost-model", "not a number"),
        (["--cost-model", "decode_s_per_token=-1"], "--cost-model", ">= 0"),
        (["--policy", "nope"], "--policy", "lru"),
        (["--max-num-seqs", "0"], "--max-num-seqs", "1"),
        (["--block-size", "16"], "--block-size", "block size 16"),
        (["--model-shape", "gpt-9"], "--model-shape", "llama-3-8b"),
        (["--curve", "1000,x"], "--curve", "cannot parse capacity"),
        (["--mode", "parallel"], "--mode", "concurrent"),
    ],
)
def test_bad_values_name_the_option(tiny, tmp_path, args, option, words):
    res = invoke(tiny, "--mode", "concurrent", *args, "--out", tmp_path / "bad")
    assert res.exit_code == 2, res.output
    assert option in res.output and words in res.output, res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_sequential_mode_notes_ignored_concurrent_options(tiny, tmp_path):
    res = invoke(tiny, "--max-num-seqs", "4", "--curve", "2", "--out", tmp_path / "o")
    assert res.exit_code == 0 and "--max-num-seqs only applies to --mode concurrent" in res.output


def test_help_lists_registered_policies_and_examples():
    res = CliRunner().invoke(cli, ["replay", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for name in list_policies():
        assert name in text
    for opt in ("--mode", "--capacity", "--policy", "--block-size", "--cost-model",
                "--max-num-seqs", "--model-shape", "--out", "--tiers", "--curve"):  # fmt: skip
        assert opt in text
    assert "--mode concurrent" in text and "5.12Mt" in text and "40GiB" in text


def test_tiers_run_concurrently_with_mode_concurrent(tmp_path):
    # sequential --tiers is covered by tests/test_sim_replay.py
    out = tmp_path / "tiers"
    res = invoke(
        "--tiers",
        "gpu=2000,cpu=8000",
        "--mode",
        "concurrent",
        "--model-shape",
        "llama-3-8b",
        "--out",
        out,
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["num_requests"] == 3993


def test_format_choices_are_the_readers_formats():
    import traces.io
    from cli.replay_cmds import replay as replay_cmd

    opt = next(p for p in replay_cmd.params if p.name == "fmt")
    assert set(opt.type.choices) == {"auto", *traces.io.FORMATS}
