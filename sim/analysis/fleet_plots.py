"""Fleet replays: the routers compared and their table; per-instance load and hits,
routers against instance counts."""

from __future__ import annotations

from typing import Any

from .plots import as_polars_frame, new_axes

__all__ = [
    "COMPARED_ROUTERS",
    "ROUTER_SUMMARY_COLUMNS",
    "plot_instances",
    "plot_routers",
    "router_columns",
    "router_summary",
]

#: The routers a fleet comparison runs (notebook 03, ``bench_fleet.py``): every
#: built-in family once, each with arguments that make it deterministic.
COMPARED_ROUTERS = (
    "round-robin",
    "random:seed=0",
    "least-load",
    "shortest-queue",
    "longest-prefix",
    "kv-aware:weight=1,temperature=0",
    "cache-aware",
    "consistent-hash:key=prefix",
)
#: The fleet figures of a run's summary that :func:`router_summary` tables.
ROUTER_SUMMARY_COLUMNS = (
    "token_hit_ratio",
    "ttft_p50_s",
    "ttft_p99_s",
    "load_imbalance",
    "best_instance_hit_ratio",
    "all_caches_hit_ratio",
    "regret_hit_ratio",
)


def router_summary(runs: dict[str, Any]) -> Any:
    """One row per fleet run of ``{router: SimResult}``: ``router`` and
    :data:`ROUTER_SUMMARY_COLUMNS` from its summary, in the dict's order."""
    import polars as pl

    rows = []
    for router, res in runs.items():
        summary = res.summary()
        rows.append({"router": router, **{c: summary[c] for c in ROUTER_SUMMARY_COLUMNS}})
    return pl.DataFrame(rows)


def plot_instances(per_instance: list[dict], ax: Any = None, *, title: str | None = None) -> Any:
    """Bars of each instance's prompt tokens (load) with its token hit ratio on a second axis."""
    fig, ax = new_axes(ax, (7, 3.5))
    ks = [r["instance"] for r in per_instance]
    ax.bar(ks, [r["prompt_tokens"] for r in per_instance], color="#9ecae1", label="prompt tokens")
    ax.set_xlabel("instance")
    ax.set_ylabel("prompt tokens routed")
    ax2 = ax.twinx()
    ax2.plot(ks, [r["token_hit_ratio"] for r in per_instance], "o-", color="#d62728")
    ax2.set_ylabel("token hit ratio", color="#d62728")
    ax2.set_ylim(0, 1)
    ax.set_xticks(ks)
    ax.set_title(title or "Load and hits per instance")
    return fig


def router_columns(df: Any) -> Any:
    """A sweep table with ``instances`` and ``router`` columns read from ``setting``."""
    import polars as pl

    df = as_polars_frame(df)
    return df.with_columns(
        pl.col("setting")
        .str.extract(r"instances=(\d+)")
        .cast(pl.Int64)
        .fill_null(1)
        .alias("instances"),
        pl.col("setting")
        .str.extract(r"router=(.+?)(?:,(?:instances|max_num_seqs|cost|tiers|model_shape)=|$)")
        .fill_null("round-robin")
        .alias("router"),
    )


def plot_routers(df: Any, axes: Any = None) -> Any:
    """Routers compared against instance count: token hit ratio, TTFT p99 (when timed), and
    load imbalance (when the table has it). ``df``: a ``sim.sweep`` table of fleet rows."""
    import matplotlib.pyplot as plt
    import polars as pl

    df = router_columns(df).filter(kind="policy")
    panels = [("token_hit_ratio", "token hit ratio")]
    if "ttft_p99_s" in df.columns and df["ttft_p99_s"].is_not_nan().any():
        panels.append(("ttft_p99_s", "TTFT p99 (s)"))
    if "load_imbalance" in df.columns and df["load_imbalance"].is_not_nan().any():
        panels.append(("load_imbalance", "load imbalance (max/mean)"))
    if axes is None:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
        axes = axes[0]
    else:
        fig = axes[0].figure
    for ax, (col, label) in zip(axes, panels):
        for (router,), part in df.group_by("router", maintain_order=True):
            agg = part.group_by("instances").agg(pl.col(col).mean().alias("y"))
            agg = agg.sort("instances")
            ax.plot(agg["instances"], agg["y"], "o-", label=router)
        ax.set_xlabel("instances")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Routers against instance count")
    fig.tight_layout()
    return fig
