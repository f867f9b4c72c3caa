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
    block_size_option,
    check_out_dir,
    clamp_capacity,
    distinct_blocks_of,
    format_option,
    inf_blocks,
    json_option,
    mode_option,
    model_shape_option,
    out_option,
    progress_option,
    read_table,
    require_model_shape,
    resolve_option,
    skip_bad_option,
    trace_formats,
)
from ._fleet import fleet_grid

__all__ = [
    "COMMANDS",
    "TRACE_FORMATS",
    "parse_capacities",
    "parse_policies",
    "plot_sweep",
    "sweep_cmd",
]


#: --format choices: "auto" and every format the trace readers know
TRACE_FORMATS = trace_formats()


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
@model_shape_option(
    "Model KV geometry for byte capacities: a preset (llama-3-8b...), "
    "LAYERS,KV_HEADS,HEAD_DIM,DTYPE (32,8,128,bf16) or a Hugging Face config.json."
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
@format_option("Format of every TRACE; auto detects it from the file's suffix and first record.")
@block_size_option(
    "Tokens per block for traces that are hashed here (token-level, Azure, BurstGPT)."
)
@skip_bad_option("Skip malformed trace records instead of failing.")
@click.option(
    "--bounds/--no-bounds",
    default=True,
    show_default=True,
    help="Add the infinite-capacity bound and OPT (when sim.opt is available).",
)
@out_option("kv_sweep_out")
@progress_option("Show a progress bar.")
@mode_option(
    "sequential",
    "sequential: one request at a time (published hit ratios); concurrent: requests "
    "on a simulated clock, so each row also gets TTFT, TPOT, E2E p50/p90/p99 and throughput.",
)
@click.option(
    "--max-num-seqs",
    "max_num_seqs",
    default=None,
    metavar="N[,N...]",
    help="Concurrent mode: most requests running at once; several values are swept "
    "(e.g. 8,32,none).",
)
@click.option(
    "--cost-model",
    "cost_models",
    multiple=True,
    metavar="NAME=VALUE,...",
    help="Concurrent mode: the cost model (as replay's --cost-model); repeat the option to "
    "sweep several.",
)
@click.option(
    "--engine",
    "engines",
    default=None,
    metavar="E[,E...]",
    help="Concurrent mode: request (the event engine) or iteration (vLLM-v1-like steps: token "
    "budget, chunked prefill, preemption; --cost-model may then be roofline:... or table:...); "
    "several values are swept (e.g. request,iteration).",
)
@click.option(
    "--instances",
    "fleet_instances",
    default=None,
    metavar="N[,N...]",
    help="Serving instances behind a router, each with its own cache of the row's capacity; "
    "several values are swept (e.g. 1,4,8). Adds routers.png.",
)
@click.option(
    "--routers",
    "fleet_routers",
    default=None,
    metavar="SPEC[,SPEC...]",
    help="Routers to sweep (replay's --router names), e.g. "
    "round-robin,kv-aware:weight=1,temperature=0,cache-aware.",
)
@json_option("Print the sweep's rows as JSON to stdout.")
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
    mode,
    max_num_seqs,
    cost_models,
    engines,
    fleet_instances,
    fleet_routers,
    as_json,
):
    """Replays of every TRACE x policy x capacity (x setting), run in parallel.

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
      sage-kv-stats sweep t.jsonl --capacities 1%,5%,20% --policies lru,s3fifo --mode concurrent
      sage-kv-stats sweep --mode concurrent --max-num-seqs 8,32 --json
      sage-kv-stats sweep --mode concurrent --engine request,iteration --capacities 2000
      sage-kv-stats sweep --mode concurrent --capacities 2000 --instances 1,4,8 \\
          --routers round-robin,kv-aware,cache-aware
    """
    import polars as pl

    from sim.sweep import sweep
    from traces import DEFAULT_TRACE

    grid = fleet_grid(
        _grid(mode, max_num_seqs, cost_models, engines), fleet_instances, fleet_routers
    )
    caps = parse_capacities(capacities)
    require_model_shape(caps, "--capacities", model_shape)
    pols = parse_policies(policies)
    check_out_dir(out_dir)
    paths = list(traces) or [Path(DEFAULT_TRACE)]
    items = [
        (path.name, read_table(path, fmt, block_size, skip_bad, {}, prefix=f"trace {path}: "))
        for path in paths
    ]
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
                    mode=mode,
                    grid=grid,
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
        "opt_bound": bool(bounds),
        "skip_bad": skip_bad,
        "mode": mode,
        "grid": {k: [str(v) for v in vs] for k, vs in (grid or {}).items()},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    fig = plot_sweep(df, title=f"Prefix-cache token hit ratio vs capacity ({mode} replay)")
    fig.savefig(out_dir / "sweep.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    if grid and ("instances" in grid or "router" in grid):
        from sim.analysis.fleet_plots import plot_routers

        fig = plot_routers(df)
        fig.savefig(out_dir / "routers.png", dpi=110)
        plt.close(fig)

    if as_json:
        click.echo(json.dumps(df.to_dicts(), indent=2, default=str).replace("NaN", "null"))
        return
    from sim.report_table import format_pivot

    specs = parse_capacities(capacities)
    labels = {b: str(sp) for sp, b in zip(specs, res["requested"][0]) if b is not None}
    click.echo(format_pivot(df, labels if uniform else None))
    click.echo(f"wrote {out_dir}/sweep.parquet, sweep.csv, sweep.png, config.json")


def _grid(
    mode: str, max_num_seqs: str | None, cost_models: tuple, engines: str | None = None
) -> dict | None:
    """The configuration fields to sweep besides capacity and policy (``sim.sweep`` grid)."""
    from sim.sweep_grid import ENGINES

    grid: dict = {}
    if engines is not None:
        names = [e.strip().lower() for e in engines.split(",") if e.strip()]
        bad = [e for e in names if e not in ENGINES]
        if bad or not names:
            raise click.BadParameter(
                f"expected {' or '.join(ENGINES)} (comma-separated), got {engines!r}",
                param_hint="--engine",
            )
        grid["engine"] = list(dict.fromkeys(names))
    if max_num_seqs is not None:
        values: list[int | None] = []
        for part in max_num_seqs.split(","):
            part = part.strip().lower()
            if part in ("none", "inf", ""):
                values.append(None)
            elif part.isdigit() and int(part) >= 1:
                values.append(int(part))
            else:
                raise click.BadParameter(
                    f"expected positive integers or none, got {part!r}", param_hint="--max-num-seqs"
                )
        grid["max_num_seqs"] = values
    if cost_models:
        step_only = grid.get("engine") == ["iteration"]
        try:
            grid["cost"] = [_cost_text(c, step_only) for c in cost_models]
        except KVCacheError as err:
            raise click.BadParameter(err.message, param_hint="--cost-model") from None
    if grid and mode == "sequential":
        raise click.BadParameter(
            "--max-num-seqs, --cost-model and --engine apply to --mode concurrent",
            param_hint="--mode",
        )
    return grid or None


def _cost_text(spec: str, step_only: bool) -> str:
    """A --cost-model value checked: the request-level linear text, or (only when every
    swept engine is iteration) a ``sim.cost`` spec such as ``roofline:gpu=h100,...``."""
    from sim.config import LinearCostModel

    if ":" in spec:
        if not step_only:
            raise click.BadParameter(
                "roofline:/table:/linear: cost models need --engine iteration",
                param_hint="--cost-model",
            )
        from sim.cost import parse_cost_model

        parse_cost_model(spec)
        return spec
    return LinearCostModel.parse(spec).to_text()


COMMANDS = [sweep_cmd]
