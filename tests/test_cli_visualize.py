"""``sage-kv-stats demo`` and ``visualize`` through CliRunner, and the plot functions."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from cli.plots import PLOT_TYPES
from sagellm_kv_cache.profiling import AccessStatsCollector

TYPES = ["heatmap", "timeline", "reuse", "hot", "position"]


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
        f"{k}.png" for k in TYPES
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
