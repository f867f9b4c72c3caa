"""``sage-kv-stats report``: one self-contained HTML page comparing runs."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import dpi_option

__all__ = ["COMMANDS", "report"]


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="HTML file to write (default RUN_DIR/report.html of the first run).",
)
@dpi_option(90, "Resolution of the embedded figures.")
def report(run_dirs: tuple[Path, ...], out: Path | None, dpi: int) -> None:
    """Write one self-contained HTML report of one or more runs.

    Figures are embedded (base64 PNG), the summaries are tabled side by side,
    and each run's resolved config.json is shown. RUN_DIRS are replay output
    folders (or anything `visualize --input` reads).

    \b
    Examples:
      sage-kv-stats report out_lru
      sage-kv-stats report out_lru out_s3fifo --out compare.html
    """
    from sagellm_kv_cache.errors import KVCacheError
    from sim.analysis.report import write_report

    for d in run_dirs:
        if not d.exists():
            raise click.FileError(str(d), hint="no such file or folder")
    if out is None and not run_dirs[0].is_dir():
        raise click.UsageError("--out is required when the first run is not a folder")
    try:
        path = write_report(list(run_dirs), out, dpi=dpi)
    except KVCacheError as exc:
        raise click.ClickException(exc.message) from None
    except OSError as exc:
        raise click.FileError(str(out), hint=str(exc)) from None
    click.echo(f"wrote {path}")


COMMANDS: list[click.Command] = [report]
