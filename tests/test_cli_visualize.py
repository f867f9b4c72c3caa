"""``sage-kv-stats demo`` and ``visualize`` through CliRunner, and the plot functions."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from sagellm_kv_cache.profiling import AccessStatsCollector
from sim.analysis.plots import PLOT_TYPES

TYPES = ["heatmap", "timeline", "reuse", "hot", "position"]
ACCESS_TYPES = [
    "heatmap",
    "position_heatmap",
    "timeline",
    "reuse",
    "reuse_cdf",
    "reuse_time_cdf",
    "hot",
    "position",
]


def assert_real_image(path) -> None:
    img = mpimg.imread(path)
    height, width = img.shape[:2]
    assert width > 400 and height > 300, (path, img.shape)
    assert img[..., :3].std() > 0.05, f"{path} looks blank"
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 10


@pytest.fixture(scope="module")
def demo_stats(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    out = folder / "demo_stats.json"
    result = CliRunner().invoke(cli, ["demo", "--num-accesses", "1000", "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_demo_records_exactly_the_requested_accesses(demo_stats):
    c = AccessStatsCollector.load(demo_stats)
    s = c.get_stats_summary()
    assert s["total_accesses"] == 1000
    assert 0.3 < s["hit_rate"] < 0.95
    rates = [p["hit_rate"] for p in s["hit_rate_by_position"]]
    assert rates[0] > rates[-1], "early prompt positions (system prompts) should hit more"
    df = c.to_polars()
    assert df["request_id"].null_count() == 0 and df["position"].min() == 0


def test_demo_is_deterministic_for_a_seed(tmp_path):
    runner = CliRunner()
    outs = []
    for name in ("a.json", "b.json"):
        r = runner.invoke(
            cli,
            ["demo", "-n", "300", "--seed", "3", "--block-size", "8", "-o", str(tmp_path / name)],
        )
        assert r.exit_code == 0, r.output
        outs.append(json.loads((tmp_path / name).read_text())["accesses"])
    assert outs[0] == outs[1]


def test_demo_prints_the_seed_summary(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "-n", "200", "-o", str(tmp_path / "d.parquet")])
    assert r.exit_code == 0, r.output
    assert "Hit rate:" in r.output and "Total accesses: 200" in r.output
    assert (
        AccessStatsCollector.load(tmp_path / "d.parquet").get_stats_summary()["total_accesses"]
        == 200
    )


def test_seed_heatmap_command(demo_stats, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(
        cli, ["visualize", "--input", str(demo_stats), "--output", "heatmap.png"]
    )
    assert r.exit_code == 0, r.output
    assert_real_image(tmp_path / "heatmap.png")


def test_heatmap_is_the_default_type_and_file(demo_stats, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["visualize", "--input", str(demo_stats)])
    assert r.exit_code == 0, r.output
    assert_real_image(tmp_path / "heatmap.png")


@pytest.mark.parametrize("kind", TYPES)
def test_each_type_writes_a_real_image(demo_stats, tmp_path, kind):
    out = tmp_path / f"{kind}.png"
    r = CliRunner().invoke(
        cli, ["visualize", "-i", str(demo_stats), "--type", kind, "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert_real_image(out)


def test_seed_all_with_summary(demo_stats, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(
        cli, ["visualize", "--input", str(demo_stats), "--type", "all", "--summary"]
    )
    assert r.exit_code == 0, r.output
    for kind in TYPES:
        assert_real_image(tmp_path / "kv_stats_figures" / f"{kind}.png")
    assert "Hit rate" in r.output and "%" in r.output
    assert "Total accesses" in r.output and "1000" in r.output


def test_all_into_a_given_folder_and_parquet_input(tmp_path):
    c = AccessStatsCollector()
    c.record_many(
        [1, 2, 1, 3, 1],
        [False, False, True, False, True],
        timestamps=[0, 1, 2, 3, 4],
        positions=[0, 1, 0, 1, 0],
    )
    src = c.export_stats(tmp_path / "s.parquet")
    r = CliRunner().invoke(
        cli, ["visualize", "-i", str(src), "--type", "all", "-o", str(tmp_path / "figs")]
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(
        f"{k}.png" for k in ACCESS_TYPES
    )


def test_missing_input_names_the_file(tmp_path):
    r = CliRunner().invoke(cli, ["visualize", "--input", str(tmp_path / "nope.json")])
    assert r.exit_code != 0
    assert "nope.json" in r.output
    assert "Traceback" not in r.output


def test_malformed_input_names_the_file(tmp_path):
    bad = tmp_path / "broken_stats.json"
    bad.write_text('{"version": 1, "accesses": ')
    r = CliRunner().invoke(cli, ["visualize", "--input", str(bad)])
    assert r.exit_code == 1
    assert "broken_stats.json" in r.output and "not valid JSON" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_all_with_a_file_as_output_is_a_usage_error(demo_stats, tmp_path):
    f = tmp_path / "x.png"
    f.write_text("")
    r = CliRunner().invoke(cli, ["visualize", "-i", str(demo_stats), "--type", "all", "-o", str(f)])
    assert r.exit_code == 2 and "folder" in r.output


@pytest.mark.parametrize("command", ["demo", "visualize"])
def test_every_command_has_help_with_examples(command):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0
    assert "Example" in r.output
    assert "sage-kv-stats " + command in r.output


def test_every_registered_command_has_help():
    for name, cmd in cli.commands.items():
        assert cmd.help and "Example" in cmd.help, name


@pytest.mark.parametrize("kind", TYPES)
def test_plot_functions_draw_into_a_given_ax_and_handle_empty_tables(kind):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert PLOT_TYPES[kind](AccessStatsCollector().to_polars(), ax=ax) is fig
    c = AccessStatsCollector()
    c.record_many(
        ["a", "b", "a"], [False, False, True], timestamps=[0.0, 1.0, 2.0], positions=[0, 1, 0]
    )
    assert PLOT_TYPES[kind](c.to_pandas()) is not None
    plt.close("all")


# --- issue 12: demo evictions, visualize reading any run -------------------------------------


def test_demo_records_its_evictions_and_block_ids_name_content(tmp_path):
    out = tmp_path / "d.json"
    r = CliRunner().invoke(cli, ["demo", "-n", "5000", "--max-cached-blocks", "64", "-o", str(out)])
    assert r.exit_code == 0, r.output
    c = AccessStatsCollector.load(out)
    s = c.get_stats_summary()
    evictions = s["evictions"]["total"]
    assert evictions > 0 and f"Evictions: {evictions}" in r.output
    # a block missed again after eviction keeps its id: fewer unique blocks than misses
    assert s["unique_blocks"] < s["misses"]
    # every miss of a block seen before follows an eviction of that block
    ev = c.evictions_to_polars()
    import polars as pl

    df = c.to_polars().with_row_index("i")
    first = df.group_by("block_id").agg(pl.col("i").min().alias("first"))
    remiss = df.join(first, on="block_id").filter(
        ~pl.col("is_hit") & (pl.col("i") > pl.col("first"))
    )
    assert remiss.height == s["misses"] - s["unique_blocks"] > 0
    evicted_at = ev.group_by("block_id").agg(pl.col("timestamp").min().alias("t_ev"))
    joined = remiss.join(evicted_at, on="block_id", how="left")
    assert joined["t_ev"].null_count() == 0
    assert (joined["t_ev"] <= joined["timestamp"]).all()
    v = CliRunner().invoke(
        cli,
        [
            "visualize",
            "-i",
            str(out),
            "--type",
            "hot",
            "--summary",
            "-o",
            str(tmp_path / "hot.png"),
        ],
    )
    assert v.exit_code == 0, v.output
    assert "Evictions" in v.output and f"  {evictions}" in v.output


RUN_TYPES = ACCESS_TYPES + [
    "hit_ratio_time",
    "hit_vs_length",
    "session_reuse",
    "footprint",
    "capacity_curve",
]


@pytest.fixture(scope="module")
def replay_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "run"
    r = CliRunner().invoke(cli, ["replay", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_visualize_all_on_a_replay_folder_draws_every_type(replay_dir, tmp_path):
    figs = tmp_path / "figs"
    r = CliRunner().invoke(
        cli,
        ["visualize", "--input", str(replay_dir), "--type", "all", "-o", str(figs), "--summary"],
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in figs.iterdir()) == sorted(f"{k}.png" for k in RUN_TYPES)
    for k in RUN_TYPES:
        assert_real_image(figs / f"{k}.png")
    assert "token_hit_ratio" in r.output


@pytest.mark.parametrize("name", ["records.parquet", "summary.json"])
def test_visualize_reads_a_runs_files(replay_dir, tmp_path, name):
    out = tmp_path / "fp.png"
    r = CliRunner().invoke(
        cli, ["visualize", "-i", str(replay_dir / name), "--type", "footprint", "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert_real_image(out)


def test_run_folder_accesses_match_the_replay(replay_dir):
    import polars as pl

    from sim.analysis import access
    from sim.analysis.runs import load_run

    run = load_run(replay_dir)
    assert run.kind == "run" and run.accesses_source == "trace"
    rec = pl.read_parquet(replay_dir / "records.parquet")
    assert run.accesses.height == rec["full_blocks"].sum()
    assert run.accesses["is_hit"].sum() == rec["hit_blocks"].sum()
    fp = access.cache_footprint(rec)
    assert fp["cached_blocks"].max() == run.capacity_blocks == 10000


def test_trace_accesses_are_an_infinite_cache():
    from sim.analysis.runs import load_run
    from sim.replay import replay_sequential
    from traces import DEFAULT_TRACE, read_trace

    run = load_run(DEFAULT_TRACE)
    ref = replay_sequential(read_trace(DEFAULT_TRACE), None)
    assert run.kind == "trace"
    # records are numpy columns or a polars DataFrame, depending on the engine's version
    assert run.records["hit_blocks"].to_list() == np.asarray(ref.records["hit_blocks"]).tolist()
    assert run.records["full_blocks"].to_list() == np.asarray(ref.records["full_blocks"]).tolist()


@pytest.mark.parametrize("kind", ["reuse_cdf", "session_reuse", "hit_vs_length"])
def test_visualize_reads_a_trace(tmp_path, kind):
    from traces import DEFAULT_TRACE

    out = tmp_path / f"{kind}.png"
    r = CliRunner().invoke(
        cli, ["visualize", "-i", str(DEFAULT_TRACE), "--type", kind, "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert_real_image(out)


def test_a_figure_the_input_cannot_draw_is_a_usage_error(demo_stats, tmp_path):
    r = CliRunner().invoke(
        cli,
        ["visualize", "-i", str(demo_stats), "--type", "footprint", "-o", str(tmp_path / "x.png")],
    )
    assert r.exit_code == 2
    assert "footprint needs records" in r.output and "heatmap" in r.output
    assert not (tmp_path / "x.png").exists()


def test_a_folder_without_run_files_is_an_error(tmp_path):
    from sagellm_kv_cache.errors import KVInvalidInputError
    from sim.analysis.runs import load_run

    with pytest.raises(KVInvalidInputError) as exc:
        load_run(tmp_path)
    assert exc.value.code == KVInvalidInputError.code
    r = CliRunner().invoke(cli, ["visualize", "-i", str(tmp_path), "--type", "all"])
    assert r.exit_code == 1 and "not a run folder" in r.output
