"""``sage-kv-stats sweep``: hit ratio vs capacity for several policies and traces, with bounds.

``plot_sweep`` draws a ``sim.sweep.sweep`` table (one panel per trace) and is
what the command and notebook 02 use.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from sagellm_kv_cache.errors import KVCacheError

from ._common import check_not_empty, check_out_dir, clamp_capacity, inf_blocks

__all__ = [
    "COMMANDS",
    "TRACE_FORMATS",
    "parse_capacities",
    "parse_policies",
    "plot_sweep",
    "sweep_cmd",
]

#: ``--format`` choices: "auto" and ``traces.io.FORMATS`` (listed here so --help stays light)
TRACE_FORMATS = ("auto", "mooncake", "bailian", "azure", "burstgpt", "tokens", "parquet")


def parse_capacities(text: str) -> list[int]:
    """``"1000,3000,10k"`` -> ``[1000, 3000, 10000]`` (block counts; ``k``/``M`` suffixes).

    Raises:
        click.BadParameter: empty, unparseable, non-block or non-positive entries.
    """
    from sim.config import parse_capacity

    caps: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            cap = parse_capacity(part)
        except KVCacheError as err:
            raise click.BadParameter(err.message, param_hint="--capacities") from None
        if cap.unit != "blocks":
            raise click.BadParameter(
                f"{part!r} is not a block count (the infinite bound is drawn anyway;"
                " give sizes in blocks, e.g. 1000,3000,10k)",
                param_hint="--capacities",
            )
        caps.append(int(cap.amount))
    if not caps:
        raise click.BadParameter(
            f"expected comma-separated block counts, got {text!r}", param_hint="--capacities"
        )
    return caps


def parse_policies(text: str) -> list[str]:
    """``"lru,fifo"`` -> ``["lru", "fifo"]``; ``"all"`` -> every registered policy.

    Raises:
        click.BadParameter: an unknown name (the message lists the known ones).
    """
    from sagellm_kv_cache.eviction.registry import list_policies, make_policy

    known = list(list_policies())
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return known
    if not names:
        raise click.BadParameter("no policy given", param_hint="--policies")
    for name in names:
        try:
            make_policy(name)
        except KVCacheError:
            raise click.BadParameter(
                f"unknown policy {name!r}; known: {', '.join(known)} (or 'all')",
                param_hint="--policies",
            ) from None
    return names


from sim.analysis.plots import plot_sweep  # noqa: E402  (moved)


@click.command("sweep")
@click.argument("traces", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--capacities",
    default="1000,3000,10000,30000",
    show_default=True,
    help="Cache sizes in blocks, comma-separated (10k = 10000). Sizes above 2**20 blocks that "
    "no trace can use (its distinct blocks) are clamped to that (same result: no evictions).",
)
@click.option(
    "--policies",
    default="lru",
    show_default=True,
    help="Eviction policies, comma-separated, or 'all' for every registered one.",
)
@click.option(
    "--executor",
    type=click.Choice(["process", "serial", "ray"]),
    default="process",
    show_default=True,
    help="Where replays run: local processes, this process, or Ray.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes (or Ray CPUs of a local instance). [default: all cores]",
)
@click.option("--ray-address", default=None, help="Ray cluster address (default: a local Ray).")
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(TRACE_FORMATS),
    help="Format of every TRACE; auto detects it from the file's suffix and first record.",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens per block for traces that are hashed here (token-level, Azure, BurstGPT).",
)
@click.option("--skip-bad", is_flag=True, help="Skip malformed trace records instead of failing.")
@click.option(
    "--bounds/--no-bounds",
    default=True,
    show_default=True,
    help="Add the infinite-capacity bound and OPT (when sim.opt is available).",
)
@click.option(
    "--out",
    "out_dir",
    default="kv_sweep_out",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory.",
)
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show a progress bar."
)
def sweep_cmd(
    traces,
    capacities,
    policies,
    executor,
    workers,
    ray_address,
    fmt,
    block_size,
    skip_bad,
    bounds,
    out_dir,
    progress,
):
    """Sequential replays of every TRACE x policy x capacity, run in parallel.

    Each replay drives the real block pool (see `sage-kv-stats replay`). With
    --bounds (default) each trace also gets its infinite-capacity hit ratio (no
    policy can beat it) and, where sim.opt is available, the offline-optimal
    (OPT) hit ratio at each capacity (no policy can beat it at that size).
    Without TRACE the bundled Mooncake trace is used.

    Writes into --out: sweep.parquet and sweep.csv (one row per trace x
    policy x capacity, plus bound rows), sweep.png (token hit ratio vs
    capacity, one panel per trace, bounds dashed) and config.json.

    \b
    Examples:
      sage-kv-stats sweep traces/data/mooncake_synthetic_trace.jsonl
      sage-kv-stats sweep a.jsonl b.jsonl --capacities 1000,3000,10k --policies all
      sage-kv-stats sweep --executor serial --no-bounds --out run1
      sage-kv-stats sweep azure.csv --format azure --block-size 16 --capacities 300,3000
      sage-kv-stats sweep t.jsonl --executor ray --ray-address auto
    """
    import polars as pl

    from sim.sweep import opt_available, sweep
    from traces import DEFAULT_TRACE, read_trace

    caps = parse_capacities(capacities)
    pols = parse_policies(policies)
    check_out_dir(out_dir)
    paths = list(traces) or [Path(DEFAULT_TRACE)]
    items = []
    for path in paths:
        stats: dict = {}
        try:
            kwargs = {"skip_bad": skip_bad, "stats": stats}
            if block_size is not None:
                kwargs["block_size"] = block_size
            items.append((path.name, read_trace(path, fmt, **kwargs)))
        except FileNotFoundError:
            raise click.FileError(str(path), hint="trace file not found") from None
        except KVCacheError as err:
            raise click.ClickException(f"trace {path}: {err.message}") from None
        check_not_empty(items[-1][1], path, stats)
    # a pool larger than every trace's distinct blocks never evicts: clamp, never allocate
    limit = max(inf_blocks(table) for _, table in items)
    requested_caps = caps
    caps = sorted({clamp_capacity(c, limit) for c in caps})
    if caps != sorted(set(requested_caps)):
        click.echo(
            f"note: capacities above {limit} blocks (every trace's distinct blocks) never evict; "
            f"clamped to {limit} (same result)",
            err=True,
        )
    try:
        df = sweep(
            items,
            caps,
            pols,
            executor=executor,
            workers=workers,
            bounds=bounds,
            progress=progress,
            ray_address=ray_address,
        )
    except KVCacheError as err:
        raise click.ClickException(err.message) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    df.write_parquet(out_dir / "sweep.parquet")
    df.write_csv(out_dir / "sweep.csv")
    config = {
        "traces": [str(p) for p in paths],
        "format": fmt,
        "block_size": block_size,
        "capacities_blocks": caps,
        "capacities_requested_blocks": requested_caps,
        "policies": pols,
        "executor": executor,
        "workers": workers,
        "ray_address": ray_address,
        "bounds": bounds,
        "opt_bound": bool(bounds and opt_available()),
        "skip_bad": skip_bad,
        "mode": "sequential",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    fig = plot_sweep(df, title="Prefix-cache token hit ratio vs capacity (sequential replay)")
    fig.savefig(out_dir / "sweep.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)

    table = df.select(
        "trace",
        "policy",
        "capacity_blocks",
        pl.col("token_hit_ratio", "block_hit_ratio").round(4),
        "evictions",
    )
    with pl.Config(
        tbl_rows=len(table),
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        tbl_width_chars=160,
        fmt_str_lengths=48,
    ):
        click.echo(str(table))
    if bounds and not opt_available():
        click.echo("note: OPT bound skipped (sim.opt is not available in this install)")
    click.echo(f"wrote {out_dir}/sweep.parquet, sweep.csv, sweep.png, config.json")


COMMANDS = [sweep_cmd]
