"""One capacity grammar through the CLI: replay --capacity, sweep --capacities, --tiers,
--model-shape (issue 12). Mistakes end in one ``Error:`` line naming the option."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from cli.sweep_cmds import parse_capacities

# 512-token blocks; 100 requests, each a 3-block chain of its own: 300 distinct blocks
TRACE = [
    {"timestamp": i * 10, "input_length": 1536, "output_length": 2, "hash_ids": [3 * i, 3 * i + 1, 3 * i + 2]}
    for i in range(100)
]  # fmt: skip


@pytest.fixture
def trace(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in TRACE))
    return p


def run(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def one_error(res, *words):
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.output
    for w in words:
        assert w in errors[0], res.output
    return errors[0]


def config_of(out):
    return json.loads((out / "config.json").read_text())


def test_replay_share_of_distinct_blocks(trace, tmp_path):
    out = tmp_path / "share"
    res = run(
        "replay", trace, "--capacity", "10%", "--curve", "5%,50%", "--no-progress", "--out", out
    )
    assert res.exit_code == 0, res.output
    config = config_of(out)
    assert config["capacity"] == "10%" and config["capacity_blocks"] == 30
    assert config["curve_capacities"] == [15, 150]


def test_replay_bytes_with_a_custom_model_shape(trace, tmp_path):
    out = tmp_path / "bytes"
    res = run(
        "replay", trace, "--capacity", "40GiB", "--model-shape", "32,8,128,bf16",
        "--curve", "1GiB", "--no-progress", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    config = config_of(out)
    # 32 layers x 8 heads x 128 x 2 (K,V) x 2 bytes = 128 KiB/token, 64 MiB per 512-token block
    assert config["capacity_blocks"] == 640 and config["curve_capacities"] == [16]
    assert config["model_shape"] == "32,8,128,bf16"


def test_replay_model_shape_from_a_hf_config(trace, tmp_path):
    hf = tmp_path / "config.json"
    hf.write_text(
        json.dumps({"num_hidden_layers": 61, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                    "num_attention_heads": 128, "torch_dtype": "bfloat16"})
    )  # fmt: skip
    out = tmp_path / "mla"
    res = run("replay", trace, "--capacity", "1GiB", "--model-shape", hf, "--no-progress",
              "--curve", "1", "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert config_of(out)["capacity_blocks"] == 2**30 // (512 * 61 * 576 * 2)  # 15


@pytest.mark.parametrize(
    "args,words",
    [
        (["--capacity", "40GiB"], ["--capacity", "needs a model shape", "--model-shape"]),
        (["--curve", "1GiB"], ["--curve", "needs a model shape"]),
        (["--capacity", "0.1%"], ["--capacity", "holds no full block", "300 distinct"]),
        (["--capacity", "-10%"], ["--capacity", "must be positive"]),
        (["--capacity", "lots"], ["--capacity", "cannot parse", "10%", "40GiB"]),
        (["--model-shape", "32,8"], ["--model-shape", "unknown model shape", "32,8,128,bf16"]),
        (["--model-shape", "no/config.json"], ["--model-shape", "no such file"]),
        (["--tiers", "gpu=40GiB"], ["--tiers", "needs a model shape"]),
        (["--tiers", "gpu=10%,cpu=5Xt"], ["--tiers", "tier 'cpu'", "unknown suffix"]),
        (["--tiers", "gpu"], ["--tiers", "NAME=CAPACITY"]),
        (
            ["--tiers", "gpu=0.1%", "--model-shape", "tiny"],
            ["--tiers", "tier 'gpu'", "holds no full block"],
        ),
    ],
)
def test_replay_capacity_mistakes_are_one_line(trace, tmp_path, args, words):
    one_error(run("replay", trace, *args, "--no-progress", "--out", tmp_path / "o"), *words)


def test_replay_tiers_in_any_unit(trace, tmp_path):
    out = tmp_path / "tiers"
    res = run(
        "replay", trace, "--tiers", "gpu=10%,cpu=40GiB", "--model-shape", "llama-3-8b",
        "--no-progress", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiers"] == {"gpu": 30, "cpu": 640}  # 10% of 300; 40 GiB / 64 MiB
    for name in ("config.json", "records.parquet", "summary.json"):
        assert (out / name).exists(), name


def test_sweep_mixed_units(trace, tmp_path):
    out = tmp_path / "sweep"
    res = run(
        "sweep", trace, "--capacities", "1%,5Mt,40GiB", "--model-shape", "llama-3-8b",
        "--executor", "serial", "--no-bounds", "--no-progress", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    config = config_of(out)
    # 1% of 300 = 3; 5,000,000 tokens / 512 = 9765; 40 GiB / 64 MiB = 640
    assert config["capacities_requested_blocks"] == [3, 9765, 640]
    assert config["capacities_blocks"] == [3, 640, 9765]
    assert config["capacities"] == ["1%", "5Mt", "40GiB"]
    assert config["capacity_axis"] == "capacity (blocks)"  # mixed units
    assert config["model_shape"] == "llama-3-8b"


def test_sweep_shares_label_their_axis(trace, tmp_path):
    out = tmp_path / "share"
    res = run("sweep", trace, "--capacities", "1%,10%,inf", "--executor", "serial",
              "--no-bounds", "--no-progress", "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    config = config_of(out)
    assert config["capacities_blocks"] == [3, 30, 300]  # inf: the trace's distinct blocks
    assert config["capacity_axis"] == "capacity (% of distinct blocks)"  # inf is a line


@pytest.mark.parametrize(
    "value,words",
    [
        ("40GiB", ["--capacities", "needs a model shape", "--model-shape"]),
        ("lots", ["--capacities", "cannot parse", "5.12Mt", "40GiB", "10%"]),
        (",", ["--capacities", "expected comma-separated capacities"]),
        ("0.1%", ["--capacities", "holds no full block"]),
    ],
)
def test_sweep_capacity_mistakes_suggest_accepted_forms(trace, tmp_path, value, words):
    res = run(
        "sweep", trace, "--capacities", value, "--executor", "serial", "--out", tmp_path / "o"
    )
    one_error(res, *words)


def test_parse_capacities_reads_every_unit():
    caps = parse_capacities("1000, 3000,10k,1.5k,5Mt,40GiB,10%,inf")
    assert [str(c) for c in caps] == ["1000", "3000", "10k", "1.5k", "5Mt", "40GiB", "10%", "inf"]
    assert [c.to_blocks(512, "llama-3-8b", 300) for c in caps[:4]] == [1000, 3000, 10000, 1500]
