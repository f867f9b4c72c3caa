"""``demo`` and ``visualize``: generate and draw KV access statistics.

Both only parse options and call the library
(:mod:`sagellm_kv_cache.profiling`) and the plots (:mod:`cli.plots`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

#: Folder that ``visualize --type all`` writes into when ``--output`` is not given.
DEFAULT_FIGURE_DIR = "kv_stats_figures"
_TYPES = ("heatmap", "timeline", "reuse", "hot", "position", "all")


def _load_collector(path: Path) -> Any:
    from sagellm_kv_cache.errors import KVTraceFormatError
    from sagellm_kv_cache.profiling import AccessStatsCollector

    try:
        return AccessStatsCollector.load(path)
    except FileNotFoundError:
        raise click.FileError(str(path), hint="no such file") from None
    except KVTraceFormatError as exc:
        raise click.ClickException(f"cannot read access statistics: {exc.message}") from None
    except OSError as exc:
        raise click.FileError(str(path), hint=str(exc)) from None


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of the main numbers of ``AccessStatsCollector.get_stats_summary()``."""
    rd, rt = summary["reuse_distance"], summary["reuse_time_s"]
    rows = [
        ("Total accesses", f"{summary['total_accesses']}"),
        ("Hits", f"{summary['hits']}"),
        ("Misses", f"{summary['misses']}"),
        ("Hit rate", f"{summary['hit_rate']:.2%}"),
        ("Unique blocks", f"{summary['unique_blocks']}"),
        ("Unique requests", f"{summary['unique_requests']}"),
        ("Duration (s)", f"{summary['duration_s']:.3f}"),
        ("Accesses per second", f"{summary['accesses_per_s']:.1f}"),
        ("Reuses / cold accesses", f"{rd['count']} / {rd['cold']}"),
        ("Reuse distance p50/p90/p99", "/".join(f"{v:g}" for v in rd["percentiles"].values())),
        ("Reuse time p50/p90/p99 (s)", "/".join(f"{v:.3g}" for v in rt["percentiles"].values())),
        ("Evictions", f"{summary['evictions']['total']}"),
    ]
    for name, w in summary.get("time_windows", {}).items():
        acc = w["accesses"]
        if acc:
            rows.append(
                (f"Accesses per {name} window (mean/max)", f"{sum(acc) / len(acc):.1f}/{max(acc)}")
            )
    width = max(len(r[0]) for r in rows)
    lines = ["KV access statistics", "=" * (width + 14)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    if summary["hottest_blocks"]:
        lines += ["", "Hottest blocks (accesses, hits):"]
        lines += [
            f"  {b['block_id']!s:<20} {b['accesses']:>8} {b['hits']:>8}"
            for b in summary["hottest_blocks"]
        ]
    if summary["hit_rate_by_position"]:
        lines += ["", "Hit rate by prompt position (block index):"]
        lines += [
            f"  {p['bucket']:<12} {p['hit_rate']:>7.1%}  ({p['accesses']} accesses)"
            for p in summary["hit_rate_by_position"]
        ]
    return "\n".join(lines)


@click.command()
@click.option(
    "--input",
    "-i",
    "input_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Statistics exported by AccessStatsCollector.export_stats or `demo` (.json or .parquet).",
)
@click.option(
    "--output",
    "-o",
    "output",
    type=click.Path(path_type=Path),
    default=None,
    help="Image file for one --type (default <type>.png, e.g. heatmap.png); "
    f"a folder for --type all (default ./{DEFAULT_FIGURE_DIR}/). The suffix picks the format (png, svg, pdf).",
)
@click.option(
    "--type",
    "plot_type",
    type=click.Choice(_TYPES),
    default="heatmap",
    show_default=True,
    help="Which figure: heatmap (blocks x time), timeline (hits/misses per window), "
    "reuse (reuse-distance histogram), hot (top blocks), position (hit ratio by prompt position), or all.",
)
@click.option("--summary", is_flag=True, help="Also print a plain-text table of the summary.")
@click.option(
    "--window-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Time window width in seconds for heatmap/timeline (default: a round width giving ~40 windows).",
)
@click.option(
    "--dpi",
    type=click.IntRange(min=30),
    default=120,
    show_default=True,
    help="Resolution of raster images.",
)
def visualize(
    input_path: Path,
    output: Path | None,
    plot_type: str,
    summary: bool,
    window_s: float | None,
    dpi: int,
) -> None:
    """Draw figures of KV-cache access statistics.

    Reads a .json or .parquet export and writes one figure, or every figure
    with --type all (into a folder: heatmap.png, timeline.png, reuse.png,
    hot.png, position.png).

    \b
    Examples:
      sage-kv-stats visualize --input stats.json --output heatmap.png
      sage-kv-stats visualize --input stats.json --type all --summary
      sage-kv-stats visualize -i stats.parquet --type timeline -o timeline.svg --window-s 10
    """
    from . import plots

    if not input_path.exists():
        raise click.FileError(str(input_path), hint="no such file")
    collector = _load_collector(input_path)
    events = collector.to_polars()
    kwargs = {"window_s": window_s}
    if plot_type == "all":
        folder = Path(DEFAULT_FIGURE_DIR) if output is None else output
        if folder.exists() and not folder.is_dir():
            raise click.UsageError(
                f"--output {folder}: with --type all, --output must be a folder, not a file"
            )
        folder.mkdir(parents=True, exist_ok=True)
        targets = {name: folder / f"{name}.png" for name in plots.PLOT_TYPES}
    else:
        targets = {plot_type: Path(f"{plot_type}.png") if output is None else output}
    for name, target in targets.items():
        fn = plots.PLOT_TYPES[name]
        fig = fn(events, **kwargs) if name in ("heatmap", "timeline") else fn(events)
        try:
            plots.save_figure(fig, target, dpi=dpi)
        except (OSError, ValueError) as exc:
            raise click.FileError(str(target), hint=str(exc)) from None
        click.echo(f"wrote {target}")
    if summary:
        click.echo(format_summary(collector.get_stats_summary()))


@click.command()
@click.option(
    "--num-accesses",
    "-n",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Accesses to record.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("demo_stats.json"),
    show_default=True,
    help="Where to export (.json or .parquet).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same accesses)."
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Tokens per KV block.",
)
@click.option(
    "--max-cached-blocks",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Prefix-cache capacity in blocks (LRU beyond it).",
)
@click.option(
    "--summary/--no-summary", default=True, show_default=True, help="Print hit rate and totals."
)
def demo(
    num_accesses: int,
    output: Path,
    seed: int,
    block_size: int,
    max_cached_blocks: int,
    summary: bool,
) -> None:
    """Generate demo access statistics from a realistic chat workload.

    Drives multi-turn chat sessions that share a few system prompts (Zipf
    popularity) through the real PrefixCache and records one access per
    prompt block (hit or miss, prompt position, request id, simulated
    time), then exports them.

    \b
    Examples:
      sage-kv-stats demo --num-accesses 1000 --output demo_stats.json
      sage-kv-stats demo -n 50000 --seed 1 --block-size 32 -o demo.parquet
      sage-kv-stats visualize --input demo_stats.json --type all --summary
    """
    from sagellm_kv_cache.errors import KVInvalidInputError
    from sagellm_kv_cache.profiling.demo import run_demo_workload

    if output.suffix.lower() not in (".json", ".parquet"):
        raise click.BadParameter(
            f"{output}: use a .json or .parquet file name", param_hint="--output"
        )
    collector = run_demo_workload(
        num_accesses, seed=seed, block_size=block_size, max_cached_blocks=max_cached_blocks
    )
    try:
        collector.export_stats(output)
    except (OSError, KVInvalidInputError) as exc:
        raise click.FileError(str(output), hint=str(exc)) from None
    click.echo(f"wrote {num_accesses} accesses to {output}")
    if summary:
        s = collector.get_stats_summary()
        click.echo(f"Hit rate: {s['hit_rate']:.2%}")
        click.echo(f"Total accesses: {s['total_accesses']}")
        click.echo(f"Unique blocks: {s['unique_blocks']}")


COMMANDS: list[click.Command] = [demo, visualize]
