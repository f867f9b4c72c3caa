"""``demo`` and ``visualize``: generate and draw KV access statistics.

Both only parse options and call the library
(:mod:`sagellm_kv_cache.profiling`) and the analyses and plots (:mod:`sim.analysis`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sim.analysis.figures import FIGURES
from sim.analysis.text import format_run_summary, format_summary

from ._common import block_size_option, choice_option, dpi_option, int_option

#: Folder that ``visualize --type all`` writes into when ``--output`` is not given.
DEFAULT_FIGURE_DIR = "kv_stats_figures"


#: --type choices: the figure registry (light: it imports its plots when drawing) and "all"
_TYPES = (*FIGURES, "all")


def _load_run(path: Path, fmt: str, block_size: int | None) -> Any:
    from sagellm_kv_cache.errors import KVCacheError
    from sim.analysis.runs import load_run

    try:
        return load_run(path, format=fmt, block_size=block_size)
    except FileNotFoundError:
        raise click.FileError(str(path), hint="no such file") from None
    except KVCacheError as exc:
        msg = exc.message if str(path) in exc.message else f"{path}: {exc.message}"
        raise click.ClickException(f"cannot read {msg}") from None
    except OSError as exc:
        raise click.FileError(str(path), hint=str(exc)) from None


@click.command()
@click.option(
    "--input",
    "-i",
    "input_path",
    required=True,
    type=click.Path(path_type=Path),
    help="A replay's output folder, its records.parquet or summary.json, a trace (any "
    "format read_trace reads), or statistics exported by AccessStatsCollector / `demo` "
    "(.json or .parquet).",
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
@choice_option(
    "--type",
    "plot_type",
    choices=_TYPES,
    default="heatmap",
    help="Which figure. Block accesses: heatmap (blocks x time), position_heatmap, timeline "
    "(hits/misses per window), reuse (reuse-distance histogram), reuse_cdf, reuse_time_cdf, "
    "hot (top blocks), position (hit ratio by prompt position). Requests: hit_ratio_time, "
    "hit_vs_length, session_reuse, footprint (blocks cached over time). Runs: capacity_curve, "
    "queue_ttft (concurrent). all: every figure the input can draw.",
)
@click.option("--summary", is_flag=True, help="Also print a plain-text table of the summary.")
@click.option(
    "--window-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Time window width in seconds for heatmap/timeline/hit_ratio_time "
    "(default: a round width giving ~40 windows).",
)
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    help="Trace format when --input is a trace (see `replay --help`).",
)
@block_size_option("Tokens per block of a token-level trace.")
@dpi_option(120, "Resolution of raster images.")
def visualize(
    input_path: Path,
    output: Path | None,
    plot_type: str,
    summary: bool,
    window_s: float | None,
    fmt: str,
    block_size: int | None,
    dpi: int,
) -> None:
    """Draw figures of a run, a trace, or KV-cache access statistics.

    Reads a replay's output folder (config.json, records.parquet,
    summary.json and, when recorded, accesses.parquet; without it the block
    accesses are derived from the trace config.json names and the replay's
    hits), a trace (hits of an infinite cache), or access statistics, and
    writes one figure, or with --type all every figure the input can draw
    into a folder (<type>.png each).

    \b
    Examples:
      sage-kv-stats visualize --input stats.json --output heatmap.png
      sage-kv-stats visualize --input stats.json --type all --summary
      sage-kv-stats visualize --input replay_out --type all -o figs
      sage-kv-stats visualize --input trace.jsonl --type reuse_cdf -o reuse.svg
      sage-kv-stats visualize -i stats.parquet --type timeline -o timeline.svg --window-s 10
    """
    from sagellm_kv_cache.errors import KVCacheError
    from sim.analysis import figures
    from sim.analysis.plots import save_figure

    if not input_path.exists():
        raise click.FileError(str(input_path), hint="no such file")
    run = _load_run(input_path, fmt, block_size)
    can = figures.available(run)
    if plot_type == "all":
        folder = Path(DEFAULT_FIGURE_DIR) if output is None else output
        if folder.exists() and not folder.is_dir():
            raise click.UsageError(
                f"--output {folder}: with --type all, --output must be a folder, not a file"
            )
        folder.mkdir(parents=True, exist_ok=True)
        targets = {name: folder / f"{name}.png" for name in can}
    else:
        if plot_type not in can:
            needs = figures.FIGURES[plot_type][0]
            raise click.UsageError(
                f"--type {plot_type} needs {needs}, which {input_path} does not have "
                f"(it can draw: {', '.join(can) or 'nothing'})"
            )
        targets = {plot_type: Path(f"{plot_type}.png") if output is None else output}
    for note in run.notes:
        click.echo(f"note: {note}")
    for name, target in targets.items():
        try:
            fig = figures.draw(run, name, window_s=window_s)
        except KVCacheError as exc:
            raise click.ClickException(exc.message) from None
        try:
            save_figure(fig, target, dpi=dpi)
        except (OSError, ValueError) as exc:
            raise click.FileError(str(target), hint=str(exc)) from None
        click.echo(f"wrote {target}")
    if summary:
        if run.collector is not None:
            click.echo(format_summary(run.collector.get_stats_summary()))
        if run.summary is not None:
            click.echo(format_run_summary(run.summary))


@click.command()
@int_option("--num-accesses", "-n", default=1000, help="Accesses to record.")
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
@int_option("--block-size", default=16, help="Tokens per KV block.")
@int_option(
    "--max-cached-blocks", default=512, help="Prefix-cache capacity in blocks (LRU beyond it)."
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
    from sim.demo_workload import run_demo_workload

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
        click.echo(f"Evictions: {s['evictions']['total']}")


COMMANDS: list[click.Command] = [demo, visualize]
