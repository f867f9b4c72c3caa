"""Figures of an access table (matplotlib + seaborn, Agg backend).

Every function takes the event table (``AccessStatsCollector.to_polars()``,
a pandas equivalent, or a collector), an optional matplotlib ``ax`` to draw
into, and returns the ``Figure``. The numbers come from
:mod:`sagellm_kv_cache.profiling.analysis`; nothing here computes::

    from cli.plots import plot_heatmap
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
    "plot_heatmap",
    "plot_hot_blocks",
    "plot_position",
    "plot_reuse",
    "plot_timeline",
    "save_figure",
]


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if "matplotlib.pyplot" not in sys.modules:
        # headless by default; a notebook that chose a backend (inline) keeps it
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def _empty(ax: Any, title: str) -> None:
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
    import seaborn as sns

    from sagellm_kv_cache.profiling import analysis

    fig, ax = _axes(ax, (11, 7))
    events = analysis.as_polars(df)
    title = (
        "KV block accesses over time"
        if by == "block"
        else "KV accesses by prompt position over time"
    )
    if events.height == 0:
        _empty(ax, title)
        return fig
    width = analysis.auto_window_s(events) if window_s is None else window_s
    heat = analysis.access_heatmap(events, by=by, window_s=width, max_rows=max_rows).to_pandas()
    matrix = heat.pivot_table(
        index="row", columns="window", values="accesses", fill_value=0, aggfunc="sum"
    )
    num_windows = int(heat["window"].max()) + 1
    matrix = matrix.reindex(columns=range(num_windows), fill_value=0)
    labels = heat.drop_duplicates("row").set_index("row")["row_label"].reindex(matrix.index)
    matrix.index = labels.to_numpy()
    matrix.columns = [f"{w * width:g}" for w in range(num_windows)]
    sns.heatmap(
        matrix,
        ax=ax,
        cmap="rocket_r",
        cbar_kws={"label": f"accesses per {width:g} s window"},
        xticklabels=max(1, num_windows // 12),
        yticklabels=max(1, len(matrix) // 24),
    )
    ax.set_title(title)
    ax.set_xlabel("time since first access (s, window start)")
    ax.set_ylabel("block popularity rank" if by == "block" else "prompt position (blocks)")
    return fig


def plot_timeline(df: Any, ax: Any = None, *, window_s: float | None = None) -> Any:
    """Stacked hits and misses per time window, with the block hit ratio on a second axis."""
    from sagellm_kv_cache.profiling import analysis

    fig, ax = _axes(ax, (11, 5))
    events = analysis.as_polars(df)
    title = "Hits and misses over time"
    if events.height == 0:
        _empty(ax, title)
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

    fig, ax = _axes(ax, (9, 5))
    title = "Reuse distance distribution"
    hist = analysis.reuse_distance_histogram(analysis.as_polars(df)).to_pandas()
    if hist.empty:
        _empty(ax, title)
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

    fig, ax = _axes(ax, (10, 6))
    title = f"Top {n} hottest blocks"
    hot = analysis.hottest_blocks(analysis.as_polars(df), n=n).to_pandas()
    if hot.empty:
        _empty(ax, title)
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

    fig, ax = _axes(ax, (10, 5))
    title = "Hit ratio by prompt position"
    pos = analysis.hit_ratio_by_position(
        analysis.as_polars(df), bucket_width=bucket_width
    ).to_pandas()
    if pos.empty:
        _empty(ax, title)
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
