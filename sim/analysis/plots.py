"""Every figure of the workbench: access tables, replays, sweeps, tiers.

Each function takes a DataFrame (polars or pandas; a collector or a list of
dicts where noted), an optional matplotlib ``ax`` (or ``axes``) to draw into,
and returns the ``Figure``. The numbers come from
:mod:`sagellm_kv_cache.profiling.analysis` and :mod:`sim.analysis.access`;
nothing here computes. matplotlib and polars are imported inside the
functions so ``import sim`` stays light::

    from sim.analysis.plots import plot_heatmap
    fig = plot_heatmap(collector.to_polars())
    fig.savefig("heatmap.png")
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "PLOT_TYPES",
    "plot_capacity_curve",
    "plot_heatmap",
    "plot_hot_blocks",
    "plot_position",
    "plot_queue_ttft",
    "plot_reuse",
    "plot_sweep",
    "plot_timeline",
    "plot_ttft",
    "save_figure",
]


def _pyplot() -> Any:
    if "matplotlib.pyplot" not in sys.modules:
        # headless by default; a notebook that chose a backend (inline) keeps it
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def as_polars_frame(df: Any) -> Any:
    import polars as pl

    if isinstance(df, pl.DataFrame):
        return df
    if isinstance(df, list):
        return pl.DataFrame(df)
    return pl.from_pandas(df)


def new_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    plt = _pyplot()
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def draw_capacity(ax: Any, capacity_blocks: int | None) -> None:
    """A dashed line at the cache's capacity (nothing when it has none)."""
    if capacity_blocks is not None:
        ax.axhline(capacity_blocks, color="grey", ls="--", lw=1, label="capacity")


def draw_no_data(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    ax.set_axis_off()


def plot_heatmap(
    df: Any,
    ax: Any = None,
    *,
    by: str = "block",
    window_s: float | None = None,
    max_rows: int = 64,
) -> Any:
    """Heatmap of access counts: rows are blocks ranked by popularity (or
    prompt positions with ``by="position"``), columns are time windows.

    With more than ``max_rows`` blocks, consecutive popularity ranks share a
    row (labelled ``#first-last``).
    """
    import numpy as np

    from sagellm_kv_cache.profiling import analysis

    fig, ax = new_axes(ax, (11, 7))
    events = analysis.as_polars(df)
    title = (
        "KV block accesses over time"
        if by == "block"
        else "KV accesses by prompt position over time"
    )
    if events.height == 0:
        draw_no_data(ax, title)
        return fig
    width = analysis.auto_window_s(events) if window_s is None else window_s
    heat = analysis.access_heatmap(events, by=by, window_s=width, max_rows=max_rows)
    rows = heat.select("row", "row_label").unique("row", keep="first").sort("row")
    num_windows = int(heat["window"].max()) + 1
    matrix = np.zeros((rows.height, num_windows))
    row_of = np.searchsorted(rows["row"].to_numpy(), heat["row"].to_numpy())
    np.add.at(matrix, (row_of, heat["window"].to_numpy()), heat["accesses"].to_numpy())
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="magma_r")
    fig.colorbar(image, ax=ax, label=f"accesses per {width:g} s window")
    x_step, y_step = max(1, num_windows // 12), max(1, rows.height // 24)
    ax.set_xticks(range(0, num_windows, x_step))
    ax.set_xticklabels([f"{w * width:g}" for w in range(0, num_windows, x_step)])
    ax.set_yticks(range(0, rows.height, y_step))
    ax.set_yticklabels(rows["row_label"].to_list()[::y_step])
    ax.set_title(title)
    ax.set_xlabel("time since first access (s, window start)")
    ax.set_ylabel("block popularity rank" if by == "block" else "prompt position (blocks)")
    return fig


def plot_timeline(df: Any, ax: Any = None, *, window_s: float | None = None) -> Any:
    """Stacked hits and misses per time window, with the block hit ratio on a second axis."""
    from sagellm_kv_cache.profiling import analysis

    fig, ax = new_axes(ax, (11, 5))
    events = analysis.as_polars(df)
    title = "Hits and misses over time"
    if events.height == 0:
        draw_no_data(ax, title)
        return fig
    width = analysis.auto_window_s(events) if window_s is None else window_s
    tl = analysis.hit_miss_timeline(events, window_s=width).to_pandas()
    x = tl["window_start_s"].to_numpy()
    ax.bar(x, tl["hits"], width=width, align="edge", color="#2a9d8f", label="hits")
    ax.bar(
        x,
        tl["misses"],
        width=width,
        align="edge",
        bottom=tl["hits"],
        color="#e76f51",
        label="misses",
    )
    ax.set_xlabel("time since first access (s)")
    ax.set_ylabel(f"accesses per {width:g} s window")
    ax.set_title(title)
    ratio_ax = ax.twinx()
    # an empty window has no ratio: leave a gap rather than draw a drop to 0
    ratio = (tl["hit_ratio"] * 100).where(tl["accesses"] > 0)
    ratio_ax.plot(
        x + width / 2, ratio, color="#264653", marker="o", markersize=3, label="block hit ratio"
    )
    ratio_ax.set_ylim(0, 105)
    ratio_ax.set_ylabel("block hit ratio (%)")
    handles = ax.get_legend_handles_labels()
    rhandles = ratio_ax.get_legend_handles_labels()
    ax.legend(handles[0] + rhandles[0], handles[1] + rhandles[1], loc="upper left")
    return fig


def plot_reuse(df: Any, ax: Any = None) -> Any:
    """Histogram of reuse distances (distinct blocks between two accesses of a block), log x."""
    from sagellm_kv_cache.profiling import analysis

    fig, ax = new_axes(ax, (9, 5))
    title = "Reuse distance distribution"
    hist = analysis.reuse_distance_histogram(analysis.as_polars(df)).to_pandas()
    if hist.empty:
        draw_no_data(ax, title)
        return fig
    # bins [lo, hi] drawn on a log axis; distance 0 is drawn at 0.5 so it shows
    left = hist["bin_lo"].clip(lower=0.5).to_numpy(dtype=float)
    right = (hist["bin_hi"] + 1).to_numpy(dtype=float)
    ax.bar(
        left, hist["count"], width=right - left, align="edge", color="#457b9d", edgecolor="white"
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("reuse distance (distinct blocks between reuses, log scale)")
    ax.set_ylabel("reuses (count)")
    ax.set_title(title)
    return fig


def plot_hot_blocks(df: Any, ax: Any = None, *, n: int = 20) -> Any:
    """Bar chart of the ``n`` most accessed blocks, hits and misses stacked."""
    from sagellm_kv_cache.profiling import analysis

    fig, ax = new_axes(ax, (10, 6))
    title = f"Top {n} hottest blocks"
    hot = analysis.hottest_blocks(analysis.as_polars(df), n=n).to_pandas()
    if hot.empty:
        draw_no_data(ax, title)
        return fig
    labels = [str(b) for b in hot["block_id"]][::-1]
    hits = hot["hits"].to_numpy()[::-1]
    misses = (hot["accesses"] - hot["hits"]).to_numpy()[::-1]
    ax.barh(labels, hits, color="#2a9d8f", label="hits")
    ax.barh(labels, misses, left=hits, color="#e76f51", label="misses")
    ax.set_xlabel("accesses (count)")
    ax.set_ylabel("block id")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return fig


def plot_position(df: Any, ax: Any = None, *, bucket_width: int | None = None) -> Any:
    """Block hit ratio by prompt position bucket (bars), with the access count per bucket."""
    from sagellm_kv_cache.profiling import analysis

    fig, ax = new_axes(ax, (10, 5))
    title = "Hit ratio by prompt position"
    pos = analysis.hit_ratio_by_position(
        analysis.as_polars(df), bucket_width=bucket_width
    ).to_pandas()
    if pos.empty:
        draw_no_data(ax, title)
        return fig
    x = range(len(pos))
    ax.bar(x, pos["hit_ratio"] * 100, color="#2a9d8f")
    ax.set_xticks(list(x), pos["bucket"], rotation=45 if len(pos) > 10 else 0)
    ax.set_ylim(0, 105)
    ax.set_xlabel("prompt position (block index bucket)")
    ax.set_ylabel("block hit ratio (%)")
    ax.set_title(title)
    for xi, (ratio, count) in enumerate(zip(pos["hit_ratio"], pos["accesses"])):
        ax.annotate(
            f"n={count}",
            (xi, ratio * 100),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    return fig


def plot_queue_ttft(
    records: Any, timeline: Any, capacity_blocks: int | None = None, axes: Any = None
) -> Any:
    """Two panels over simulated time: per-request TTFT and queueing delay (by arrival),
    and the waiting / running request counts with the blocks in use.

    Args:
        records: one row per request (``arrival_s``, ``ttft_s``, ``queue_s``,
            ``rejected``), e.g. ``ConcurrentResult.records``.
        timeline: ``time_s``, ``waiting``, ``running``, ``blocks_in_use``.
        capacity_blocks: drawn as a line on the blocks-in-use axis when given.
        axes: two matplotlib axes to draw on (default: a new figure).

    Returns:
        the figure.
    """
    import polars as pl

    plt = _pyplot()
    records, timeline = as_polars_frame(records), as_polars_frame(timeline)
    if axes is None:
        fig, axes = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    fig = axes[0].figure
    ax1, ax2 = axes
    ran = records.filter(~pl.col("rejected")) if "rejected" in records.columns else records
    ax1.scatter(ran["arrival_s"], ran["ttft_s"], s=4, alpha=0.5, label="TTFT")
    ax1.scatter(ran["arrival_s"], ran["queue_s"], s=4, alpha=0.5, label="queueing delay")
    ax1.set_ylabel("seconds (simulated)")
    ax1.set_title("Concurrent replay: TTFT and queueing delay by arrival time")
    ax1.grid(alpha=0.3)
    ax1.legend(markerscale=3)
    ax2.step(timeline["time_s"], timeline["waiting"], where="post", label="waiting requests")
    ax2.step(timeline["time_s"], timeline["running"], where="post", label="running requests")
    ax2.set_xlabel("simulated time (s)")
    ax2.set_ylabel("requests")
    ax2.grid(alpha=0.3)
    ax3 = ax2.twinx()
    ax3.step(
        timeline["time_s"],
        timeline["blocks_in_use"],
        where="post",
        color="tab:green",
        alpha=0.6,
        label="blocks in use",
    )
    draw_capacity(ax3, capacity_blocks)
    ax3.set_ylabel("blocks in use")
    ax3.set_ylim(bottom=0)
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_ttft(
    per_req: Any, dev_req: Any = None, names: list[str] | None = None, ax: Any = None
) -> Any:
    """CDF of modelled TTFT: all tiers, the device tier alone, recompute everything.

    Args:
        per_req: columns ``ttft_s`` and ``recompute_s`` (a DataFrame or a dict of lists).
        dev_req: the same replay with the device tier alone (``ttft_s``), or None.
        names: tier names, first the device tier (legend labels).
        ax: a matplotlib axis to draw on (default: a new figure).
    """
    import numpy as np

    plt = _pyplot()
    names = list(names or ["all tiers"])
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
    else:
        fig = ax.figure
    series = [(" + ".join(names), per_req["ttft_s"])]
    if dev_req is not None:
        series.append((f"{names[0]} only", dev_req["ttft_s"]))
    series.append(("recompute all", per_req["recompute_s"]))
    for label, vals in series:
        a = np.sort(np.asarray(vals, dtype=float))
        ax.plot(a, np.arange(1, len(a) + 1) / max(len(a), 1), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("modelled time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT with and without the lower tiers")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_capacity_curve(
    curve: Any,
    ax: Any = None,
    *,
    this_run: tuple[float, float] | None = None,
    block_size: int | None = None,
    mode: str = "sequential",
    capacity_label: str | None = None,
) -> Any:
    """Token hit ratio vs capacity (log x), one line per policy, the infinite bound dashed.

    Args:
        curve: rows with ``policy``, ``capacity_blocks``, ``token_hit_ratio``
            (a DataFrame or a list of dicts); policy ``"infinite"`` is the bound.
        ax: a matplotlib axis to draw on (default: a new figure).
        this_run: ``(capacity_blocks, token_hit_ratio)`` of the run, drawn as a red dot.
        block_size: tokens per block, for the x label.
        mode: the replay mode of ``this_run`` (legend label).
        capacity_label: x label overriding the one built from ``block_size``.
    """
    import polars as pl

    fig, ax = new_axes(ax, (8, 5))
    df = as_polars_frame(curve)
    if df.height:
        finite = df.filter(pl.col("policy") != "infinite")
        for policy in sorted(finite["policy"].unique().to_list()):
            pts = finite.filter(pl.col("policy") == policy).sort("capacity_blocks")
            ax.plot(
                pts["capacity_blocks"],
                pts["token_hit_ratio"],
                marker="o",
                label=f"{policy} (sequential replay)",
            )
        inf = df.filter(pl.col("policy") == "infinite")
        if inf.height:
            ax.axhline(inf["token_hit_ratio"][0], color="grey", ls="--", label="infinite capacity")
    if this_run is not None:
        ax.scatter(
            [this_run[0]],
            [this_run[1]],
            color="red",
            zorder=5,
            label="this run" if mode == "sequential" else f"this run ({mode})",
        )
    ax.set_xscale("log")
    if capacity_label is None:
        capacity_label = (
            f"cache capacity (blocks of {block_size} tokens)"
            if block_size
            else "cache capacity (blocks)"
        )
    ax.set_xlabel(capacity_label)
    ax.set_ylabel("token hit ratio")
    ax.set_ylim(0, 1)
    ax.set_title("Prefix-cache hit ratio vs capacity")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_sweep(
    df: Any,
    *,
    title: str | None = None,
    panel_size: tuple[float, float] = (7, 4.5),
    max_cols: int = 3,
    axes: Any = None,
) -> Any:
    """Token hit ratio vs capacity (log x), one panel per trace (``max_cols`` a row).

    Policies are solid lines with markers; the OPT bound (rows with policy
    ``"opt"``) a dashed black curve; the infinite-capacity bound a dashed grey
    horizontal line. ``df`` is a ``sim.sweep.sweep`` table (polars or pandas).
    ``axes``: one matplotlib axis per trace to draw into (default: a new figure).
    """
    import polars as pl

    plt = _pyplot()
    df = as_polars_frame(df)
    trace_names = df["trace"].unique(maintain_order=True).to_list() or ["(no data)"]
    n = len(trace_names)
    if axes is None:
        ncols = min(n, max_cols)
        nrows = -(-n // ncols)
        fig, grid = plt.subplots(
            nrows,
            ncols,
            figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
            squeeze=False,
            layout="constrained",
        )
        flat = list(grid.flat)
    else:
        flat = list(getattr(axes, "flat", axes)) if not hasattr(axes, "figure") else [axes]
        fig = flat[0].figure
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax, name in zip(flat, trace_names):
        sub = df.filter(pl.col("trace") == name)
        if sub.height == 0:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for policy in sub.filter(pl.col("kind") == "policy")["policy"].unique(maintain_order=True):
            pts = sub.filter(pl.col("policy") == policy).sort("capacity_blocks")
            ax.plot(pts["capacity_blocks"], pts["token_hit_ratio"], marker="o", label=policy)
        opt = sub.filter(pl.col("policy") == "opt").sort("capacity_blocks")
        if opt.height:
            ax.plot(
                opt["capacity_blocks"],
                opt["token_hit_ratio"],
                color="black",
                ls="--",
                marker="x",
                label="OPT (offline optimal)",
            )
        inf = sub.filter(pl.col("policy") == "infinite")
        if inf.height:
            ax.axhline(inf["token_hit_ratio"][0], color="grey", ls="--", label="infinite capacity")
        block_size = int(sub["block_size"][0])
        ax.set_xscale("log")
        top = float(sub["token_hit_ratio"].max() or 0.0)
        ax.set_ylim(0, min(1.0, max(0.05, top * 1.15)))
        ax.set_xlabel(f"cache capacity (blocks of {block_size} tokens, log scale)")
        ax.set_ylabel("token hit ratio")
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="best", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


#: ``--type`` name -> plot function; ``all`` draws each into ``<name>.png``.
PLOT_TYPES: dict[str, Callable[..., Any]] = {
    "heatmap": plot_heatmap,
    "timeline": plot_timeline,
    "reuse": plot_reuse,
    "hot": plot_hot_blocks,
    "position": plot_position,
}


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` (format from the suffix) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
