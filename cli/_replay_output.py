"""What every ``replay`` mode does last: the same files, figures and compact table.

matplotlib is imported only when a figure is drawn (through :mod:`sim.analysis.plots`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sagellm_kv_cache.errors import KVCacheError

from ._fleet import format_fleet


def detected_format(trace: Any, fmt: str) -> str:
    """The format the reader used: ``fmt``, or what ``auto`` detected."""
    if fmt != "auto":
        return fmt
    from traces.detect import detect_format

    try:
        return detect_format(trace)
    except KVCacheError:  # pragma: no cover - the reader already accepted the file
        return fmt


def finish_run(result: Any, out_dir: Path, trace: Any, fmt: str, stats: dict, figures: dict,
               as_json: bool) -> None:  # fmt: skip
    """Write ``result``'s files and ``figures`` (name -> draw(path)) into ``out_dir``, then
    print the compact table (or the summary as JSON on stdout with ``as_json``)."""
    result.config.update(
        {"trace": str(trace), "format": detected_format(trace, fmt), "format_requested": fmt}
    )
    result.extra["skipped_records"] = stats.get("skipped", 0)
    files = result.write(out_dir)
    for name, draw in figures.items():
        draw(out_dir / name)
        files.append(name)
    if as_json:  # the summary.json just written: one serialisation of the summary
        click.echo((out_dir / "summary.json").read_text())
        return
    from sim.report_table import format_summary

    click.echo(f"trace                {trace}")
    click.echo(format_summary(result.summary()))
    if "per_instance" in result.summary():
        click.echo(format_fleet(result.summary()))
    click.echo(f"wrote {out_dir}/{', '.join(files)}")


def plot_instances(result: Any, path: Path) -> None:
    from sim.analysis.fleet_plots import plot_instances as draw
    from sim.analysis.plots import save_figure

    save_figure(draw(result.per_instance, title=f"router {result.router}"), path)


def plot_queue(result: Any, path: Path) -> None:
    from sim.analysis.plots import plot_queue_ttft, save_figure

    save_figure(plot_queue_ttft(result.records, result.timeline, result.capacity_blocks), path)


def plot_tiers(result: Any, path: Path) -> None:
    from sim.analysis.plots import plot_ttft, save_figure

    rec = result.records.filter(~result.records["rejected"])
    tps = result["config"]["prefill_tps"]
    per = {"ttft_s": rec["ttft_s"], "recompute_s": rec["input_length"] / tps}
    save_figure(plot_ttft(per, None, list(result.tiers)), path)


def plot_curve(curve: list[dict], result: Any, path: Path, mode: str = "sequential") -> None:
    from sim.analysis.plots import plot_capacity_curve, save_figure

    this_run = (result.capacity_blocks, result.token_hit_ratio)
    fig = plot_capacity_curve(curve, this_run=this_run, block_size=result.block_size, mode=mode)
    save_figure(fig, path)
