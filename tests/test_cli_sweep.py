"""``sage-kv-stats sweep`` through CliRunner: output files, the figure, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from cli.main import cli
from cli.sweep_cmds import parse_capacities, plot_sweep
from sim.replay import replay_sequential
from traces import DEFAULT_TRACE, read_trace


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver():
    """The process executor forks workers from multiprocessing's forkserver; stop it after."""
    yield
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)
    if stop is not None:
        stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The bundled trace's first 120 requests as a JSONL file."""
    path = tmp_path_factory.mktemp("traces") / "tiny.jsonl"
    path.write_text("\n".join(DEFAULT_TRACE.read_text().splitlines()[:120]) + "\n")
    return path


def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result


def test_sweep_writes_files_and_figure(tiny, tmp_path):
    out = tmp_path / "out"
    result = _run(
        [
            "sweep",
            str(tiny),
            "--capacities",
            "30,100,1k",
            "--policies",
            "lru",
            "--executor",
            "serial",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert result.exit_code == 0, result.output
    for name in ("sweep.parquet", "sweep.csv", "sweep.png", "config.json"):
        assert (out / name).is_file(), name
    df = pl.read_parquet(out / "sweep.parquet")
    lru = df.filter(pl.col("policy") == "lru")
    assert lru["capacity_blocks"].to_list() == [30, 100, 1000]
    table = read_trace(tiny)
    assert lru["hit_blocks"].to_list() == [
        replay_sequential(table, c).hit_blocks for c in (30, 100, 1000)
    ]
    bounds = set(df.filter(pl.col("kind") == "bound")["policy"])
    assert bounds == {"infinite", "opt"}
    csv = pl.read_csv(out / "sweep.csv")
    assert csv.height == df.height and csv["hit_blocks"].to_list() == df["hit_blocks"].to_list()
    config = json.loads((out / "config.json").read_text())
    assert config["capacities_blocks"] == [30, 100, 1000] and config["policies"] == ["lru"]

    import matplotlib.image as mpimg

    img = mpimg.imread(out / "sweep.png")
    assert img.shape[0] >= 300 and img.shape[1] >= 500
    assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas
    assert "tiny.jsonl" in result.output and "wrote" in result.output


def test_two_traces_process_executor_no_bounds(tiny, tmp_path):
    out = tmp_path / "out"
    result = _run(
        [
            "sweep",
            str(tiny),
            str(tiny),
            "--capacities",
            "50",
            "--executor",
            "process",
            "--workers",
            "2",
            "--no-bounds",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out / "sweep.parquet")
    assert df.select("trace", "policy").rows() == [("tiny.jsonl", "lru"), ("tiny.jsonl#2", "lru")]
    assert df["hit_blocks"][0] == df["hit_blocks"][1]


def test_engine_is_swept_with_a_step_cost_model(tiny, tmp_path):
    out = tmp_path / "out"
    args = ["sweep", str(tiny), "--capacities", "50", "--mode", "concurrent", "--no-bounds"]
    args += ["--engine", "iteration", "--cost-model", "roofline:gpu=h100,model=llama-2-7b"]
    result = _run([*args, "--cost-model", "linear:step_overhead_s=1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out / "sweep.parquet")
    assert df["setting"].to_list() == [
        "engine=iteration,cost=roofline:gpu=h100,model=llama-2-7b",
        "engine=iteration,cost=linear:step_overhead_s=1",
    ]
    assert df["ttft_p50_s"][0] > 0 and df["ttft_p50_s"][1] > 0
    assert df["ttft_p50_s"][0] != df["ttft_p50_s"][1]  # each row ran its own cost model
    both = _run(["sweep", str(tiny), "--capacities", "50", "--mode", "concurrent", "--no-bounds",
                 "--engine", "request,iteration", "--out", str(tmp_path / "b")])  # fmt: skip
    assert both.exit_code == 0, both.output
    df = pl.read_parquet(tmp_path / "b" / "sweep.parquet")
    assert df["setting"].to_list() == ["engine=request", "engine=iteration"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--capacities", "abc"], "--capacities"),
        (["--capacities", "0"], "--capacities"),
        (["--capacities", ","], "--capacities"),
        (["--capacities", "40GiB"], "--capacities"),  # bytes without --model-shape
        (["--policies", "lru,nope"], "--policies"),
        (["--executor", "threads"], "--executor"),
        (["--workers", "0"], "--workers"),
        (["--format", "csvx"], "--format"),
        (["--engine", "steps", "--mode", "concurrent"], "--engine"),
        (["--engine", "iteration"], "--mode"),  # a grid field needs a clock
        (
            ["--cost-model", "roofline:gpu=h100,model=llama-2-7b", "--mode", "concurrent"],
            "--cost-model",
        ),
    ],
)
def test_bad_options_name_the_option(tiny, tmp_path, args, needle):
    result = CliRunner().invoke(
        cli, ["sweep", str(tiny), "--out", str(tmp_path / "o"), "--no-progress", *args]
    )
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (tmp_path / "o").exists()


def test_missing_and_malformed_trace_name_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = CliRunner().invoke(cli, ["sweep", str(missing), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "nope.jsonl" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10}\n')
    result = CliRunner().invoke(cli, ["sweep", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    assert "bad.jsonl:1: field" in result.output  # file, line and field of the first bad record
    assert not (tmp_path / "o").exists()


def test_other_format_with_block_size(tmp_path):
    from traces import io as trace_io

    if "azure" not in getattr(trace_io, "FORMATS", ()):
        pytest.skip("the Azure reader is not in this checkout")
    sample = Path(trace_io.__file__).resolve().parent / "data" / "azure_code_sample.csv"
    out = tmp_path / "out"
    args = ["sweep", str(sample), "--format", "azure", "--block-size", "32", "--capacities", "200"]
    result = _run(
        [*args, "--executor", "serial", "--no-bounds", "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out / "sweep.parquet")
    assert df["block_size"].to_list() == [32] and df["full_blocks"][0] > 0
    assert json.loads((out / "config.json").read_text())["block_size"] == 32


def test_format_choices_track_the_readers():
    from cli.sweep_cmds import TRACE_FORMATS
    from traces import io as trace_io

    assert ("auto", *trace_io.FORMATS) == TRACE_FORMATS


def test_help_has_examples():
    result = CliRunner().invoke(cli, ["sweep", "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "sage-kv-stats sweep" in result.output


def test_parse_capacities_units():
    caps = parse_capacities("1000, 3000,10k,1.5k,5Mt,10%")
    assert [(c.amount, c.unit) for c in caps] == [
        (1000, "blocks"),
        (3000, "blocks"),
        (10000, "blocks"),
        (1500, "blocks"),
        (5_000_000, "tokens"),
        (10, "share"),
    ]


def test_plot_sweep_one_panel_per_trace():
    rows = []
    for trace in ("a", "b"):
        for cap, ratio in ((10, 0.1), (100, 0.3)):
            rows.append((trace, "lru", "policy", cap, ratio))
            rows.append((trace, "opt", "bound", cap, ratio + 0.1))
            rows.append((trace, "infinite", "bound", cap, 0.5))
    df = pl.DataFrame(
        rows,
        schema=["trace", "policy", "kind", "capacity_blocks", "token_hit_ratio"],
        orient="row",
    ).with_columns(pl.lit(16).alias("block_size"))
    fig = plot_sweep(df, max_cols=1)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["a", "b"]
    assert axes[0].get_position().y0 > axes[1].get_position().y0  # stacked: one per row
    ax = axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["lru", "OPT (offline optimal)", "infinite capacity"]
    assert ax.get_xscale() == "log"
    dashed = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert dashed["OPT (offline optimal)"] == "--" and dashed["infinite capacity"] == "--"
    import matplotlib.pyplot as plt

    plt.close(fig)


# -- issue 12: sweeps over configuration fields, timing where there is a clock, the pivot --------
def test_concurrent_sweep_gives_ttft_per_row_and_the_pivot(tmp_path):
    out = tmp_path / "o"
    args = ["sweep", "--capacities", "1%,5%,20%", "--policies", "lru,s3fifo"]
    res = CliRunner().invoke(
        cli, [*args, "--mode", "concurrent", "--executor", "serial", "--no-progress", "--out", out]
    )
    assert res.exit_code == 0, res.output
    df = pl.read_parquet(out / "sweep.parquet")
    pol = df.filter(pl.col("kind") == "policy")
    assert pol.height == 6 and set(pol["mode"]) == {"concurrent"}
    assert pol["ttft_p50_s"].is_nan().sum() == 0 and pol["ttft_p99_s"].is_nan().sum() == 0
    assert (pol["ttft_p99_s"] >= pol["ttft_p50_s"]).all()
    assert df.filter(pl.col("kind") == "bound")["ttft_p50_s"].is_nan().all()  # no clock
    text = res.output
    assert "token hit ratio" in text and "ratio to OPT" in text and "TTFT p50 / p99" in text
    assert "1%" in text and "20%" in text  # capacity in the unit given
    header = next(i for i, x in enumerate(text.splitlines()) if x.startswith("policy"))
    rows = text.splitlines()[header + 1 : header + 3]
    for col in range(3):  # one best marker per capacity column
        cells = [r.split()[1 + col] for r in rows]
        assert sum(c.endswith("*") for c in cells) >= 1
    assert len(text.splitlines()) < 30


def test_sweep_json_and_a_max_num_seqs_grid(tiny, tmp_path):
    res = CliRunner().invoke(
        cli,
        [
            "sweep",
            str(tiny),
            "--capacities",
            "4",
            "--mode",
            "concurrent",
            "--max-num-seqs",
            "1,none",
            "--executor",
            "serial",
            "--no-bounds",
            "--json",
            "--no-progress",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["setting"] for r in rows] == ["max_num_seqs=1", "max_num_seqs=None"]
    assert all(r["ttft_p50_s"] is not None for r in rows)


def test_max_num_seqs_in_a_sequential_sweep_is_an_error(tiny, tmp_path):
    res = CliRunner().invoke(
        cli, ["sweep", str(tiny), "--max-num-seqs", "4", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "--mode" in res.output
