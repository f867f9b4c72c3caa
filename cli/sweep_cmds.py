"""``sage-kv-stats sweep``: hit ratio vs capacity for several policies and traces, with bounds.

``plot_sweep`` draws a ``sim.sweep.sweep`` table (one panel per trace) and is
what the command and notebook 02 use.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from sagellm_kv_cache.errors import KVCacheError

from ._common import (
    ModelShapeType,
    check_not_empty,
    check_out_dir,
    clamp_capacity,
    distinct_blocks_of,
    inf_blocks,
    require_model_shape,
    resolve_option,
)

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


def parse_capacities(text: str) -> list:
    """``"1%,5Mt,40GiB,10k"`` -> ``sim.capacity.CapacitySpec`` list (the ``--capacity``
    grammar; resolved per trace by :func:`resolve_capacities`).

    Raises:
        click.BadParameter: empty or unparseable entries (one line naming --capacities).
    """
    from sim.capacity import GRAMMAR, parse_capacity

    caps = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            caps.append(parse_capacity(part))
        except KVCacheError as err:
            raise click.BadParameter(err.message, param_hint="--capacities") from None
    if not caps:
        raise click.BadParameter(
            f"expected comma-separated capacities ({GRAMMAR}), got {text!r}",
            param_hint="--capacities",
        )
    return caps


def resolve_capacities(specs: list, items: list, model_shape=None) -> dict:
    """Each trace's capacities in blocks: ``requested`` (in ``specs`` order; ``inf`` is
    the trace's distinct blocks) and ``swept`` (sorted, distinct, clamped as the module
    doc of ``cli/_common.py`` says), plus the ``axis`` label all of them share.

    Raises:
        click.BadParameter: a byte size without --model-shape, a size under one block.
    """
    from sim.capacity import capacity_axis

    limit = max(inf_blocks(table) for _, table in items)
    requested, swept, axes = [], [], set()
    for _, table in items:
        bs = int(table["block_size"][0])
        distinct = distinct_blocks_of(table)
        resolved = [
            resolve_option(
                spec,
                "--capacities",
                block_size=bs,
                model_shape=model_shape,
                distinct_blocks=distinct,
            )
            for spec in specs
        ]
        axes.add(capacity_axis(resolved)[0])
        req = [inf_blocks(table) if c.blocks is None else c.blocks for c in resolved]
        requested.append(req)
        swept.append(sorted({clamp_capacity(b, limit) for b in req}))
    axis = axes.pop() if len(axes) == 1 else "capacity (blocks)"
    return {"limit": limit, "requested": requested, "swept": swept, "axis": axis}


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
    help="Cache sizes, comma-separated, in any --capacity unit of replay: 2000 or 10k "
    "(blocks), 5.12Mt (tokens), 40GiB (bytes; needs --model-shape), 10% (of each trace's "
    "distinct blocks), inf. Sizes above 2**20 blocks that no trace can use (its distinct "
    "blocks) are clamped to that (same result: no evictions).",
)
@click.option(
    "--model-shape",
    type=ModelShapeType(),
    default=None,
    help="Model KV geometry for byte capacities: a preset (llama-3-8b...), "
    "LAYERS,KV_HEADS,HEAD_DIM,DTYPE (32,8,128,bf16) or a Hugging Face config.json.",
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
    model_shape,
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
    require_model_shape(caps, "--capacities", model_shape)
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
    res = resolve_capacities(caps, items, model_shape)
    limit, swept = res["limit"], res["swept"]
    uniform = all(s == swept[0] for s in swept)
    by_name = [name for name, _ in items]
    requested_caps = res["requested"][0] if uniform else dict(zip(by_name, res["requested"]))
    caps = swept[0] if uniform else dict(zip(by_name, swept))
    if any(sorted(set(r)) != s for r, s in zip(res["requested"], swept)):
        click.echo(
            f"note: capacities above {limit} blocks (every trace's distinct blocks) never evict; "
            f"clamped to {limit} (same result)",
            err=True,
        )
    # one sweep when every trace resolves to the same sizes, else one per trace
    groups = [(items, swept[0])] if uniform else [([it], s) for it, s in zip(items, swept)]
    try:
        df = pl.concat(
            [
                sweep(
                    group,
                    group_caps,
                    pols,
                    executor=executor,
                    workers=workers,
                    bounds=bounds,
                    progress=progress,
                    ray_address=ray_address,
                )
                for group, group_caps in groups
            ]
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
        "capacities": [str(c) for c in parse_capacities(capacities)],
        "capacity_axis": res["axis"],
        "model_shape": model_shape,
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
