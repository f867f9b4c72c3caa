"""``sage-kv-stats replay``: replay a trace through the library's pool (sequential mode)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sagellm_kv_cache.errors import KVCacheError


def _capacities(text: str) -> list[int]:
    try:
        caps = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated block counts, got {text!r}") from None
    if not caps or min(caps) < 1:
        raise click.BadParameter("capacities must be positive block counts")
    return caps


@click.command()
@click.argument("trace", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", default="auto", show_default=True, help="Trace format (mooncake).")
@click.option(
    "--capacity", default="10000", show_default=True, help="Cache capacity in blocks, or 'inf'."
)
@click.option("--policy", default="lru", show_default=True, help="Eviction policy name.")
@click.option(
    "--curve",
    "curve_caps",
    default="1000,3000,10000,30000",
    show_default=True,
    help="Capacities (blocks) of the hit-ratio-vs-capacity figure.",
)
@click.option(
    "--tiers",
    default=None,
    help="Tiered replay instead: capacities in blocks per tier, e.g. gpu=2000,cpu=8000,disk=100000.",
)
@click.option(
    "--skip-bad", is_flag=True, help="Skip and count malformed records instead of stopping."
)
@click.option(
    "--out",
    "out_dir",
    default="kv_replay_out",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show progress bars."
)
def replay(trace, fmt, capacity, policy, curve_caps, tiers, skip_bad, out_dir, progress):
    """Replay a request trace through the real block pool and prefix cache.

    Sequential mode: each request looks up its leading cached blocks, allocates
    the rest (evicting by POLICY when full), caches its full blocks and is
    released before the next arrives. Writes config.json, records.parquet,
    summary.json and hit_ratio_vs_capacity.png into --out.

    \b
    Examples:
      sage-kv-stats replay                               # bundled Mooncake trace
      sage-kv-stats replay trace.jsonl --capacity 30000 --out run1
      sage-kv-stats replay --capacity inf --curve 500,2000,8000
      sage-kv-stats replay --tiers gpu=2000,cpu=8000     # GPU + CPU tiers, TTFT model
    """
    import polars as pl

    from sim.replay import hit_ratio_curve, replay_sequential
    from traces import DEFAULT_TRACE, read_trace

    trace = trace or DEFAULT_TRACE
    if not Path(trace).exists():
        raise click.FileError(str(trace), hint="trace file not found")
    if tiers:
        _replay_tiers(trace, fmt, tiers, policy, skip_bad, out_dir)
        return
    cap = None if str(capacity).lower() in ("inf", "infinite") else _capacities(str(capacity))[0]
    stats: dict = {}
    try:
        table = read_trace(trace, fmt, skip_bad=skip_bad, stats=stats)
        result = replay_sequential(table, cap, policy, progress=progress)
        curve = hit_ratio_curve(table, _capacities(curve_caps), (policy,), progress=progress)
    except KVCacheError as err:
        raise click.ClickException(err.message) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "trace": str(trace),
        "format": fmt,
        "capacity_blocks": result.capacity_blocks,
        "policy": policy,
        "block_size": result.block_size,
        "mode": "sequential",
        "curve_capacities": _capacities(curve_caps),
        "skip_bad": skip_bad,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    pl.DataFrame(
        {k: list(v) if v.dtype == object else v for k, v in result.records.items()}
    ).write_parquet(out_dir / "records.parquet")
    summary = {**result.summary(), "skipped_records": stats.get("skipped", 0), "curve": curve}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot_curve(curve, result, out_dir / "hit_ratio_vs_capacity.png")
    click.echo(f"trace              {trace}")
    click.echo(f"requests           {result.num_requests}")
    click.echo(f"capacity (blocks)  {result.capacity_blocks}  policy {policy}")
    click.echo(f"token_hit_ratio    {result.token_hit_ratio:.4f}")
    click.echo(f"block_hit_ratio    {result.block_hit_ratio:.4f}")
    click.echo(f"request_hit_ratio  {result.request_hit_ratio:.4f}")
    click.echo(f"evictions          {result.evictions}")
    click.echo(
        f"wrote {out_dir}/summary.json, records.parquet, config.json, hit_ratio_vs_capacity.png"
    )


def _parse_tiers(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected NAME=BLOCKS, got {part!r}", param_hint="--tiers")
        try:
            out[name.strip()] = int(float(value))
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is not a block count", param_hint="--tiers"
            ) from None
    return out


def _replay_tiers(trace, fmt, tiers, policy, skip_bad, out_dir) -> None:
    from types import SimpleNamespace

    from sim.tiered import replay_tiered
    from traces import read_trace

    spec = _parse_tiers(tiers)
    try:
        table = read_trace(trace, fmt, skip_bad=skip_bad)
        config = SimpleNamespace(
            block_size=int(table["block_size"][0]), sequential=True, policy=policy
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = replay_tiered(table, tiers=spec, config=config, out_dir=out_dir)
    except KVCacheError as err:
        raise click.ClickException(err.message) from None
    click.echo(json.dumps(summary, indent=2, default=str)[:4000])
    click.echo(f"wrote {out_dir}/summary.json and the TTFT figure")


def _plot_curve(curve: list[dict], result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    finite = [r for r in curve if r["policy"] != "infinite"]
    inf = [r for r in curve if r["policy"] == "infinite"]
    for policy in sorted({r["policy"] for r in finite}):
        pts = sorted(
            (r["capacity_blocks"], r["token_hit_ratio"]) for r in finite if r["policy"] == policy
        )
        ax.plot(*zip(*pts), marker="o", label=f"{policy} (sequential replay)")
    if inf:
        ax.axhline(inf[0]["token_hit_ratio"], color="grey", ls="--", label="infinite capacity")
    ax.scatter(
        [result.capacity_blocks], [result.token_hit_ratio], color="red", zorder=5, label="this run"
    )
    ax.set_xscale("log")
    ax.set_xlabel(f"cache capacity (blocks of {result.block_size} tokens)")
    ax.set_ylabel("token hit ratio")
    ax.set_ylim(0, 1)
    ax.set_title("Prefix-cache hit ratio vs capacity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COMMANDS = [replay]
