"""Figures of per-request tables and reuse CDFs (see :mod:`sim.analysis.access`).

Each takes a DataFrame (polars or pandas), an optional matplotlib ``ax``, and
returns the ``Figure``.
"""

from __future__ import annotations

from typing import Any

from .plots import draw_capacity, draw_no_data, new_axes

__all__ = [
    "plot_cache_footprint",
    "plot_hit_ratio_over_time",
    "plot_hit_vs_prompt_length",
    "plot_reuse_cdf",
    "plot_session_reuse",
]


def records_axes(
    records: Any, ax: Any, figsize: tuple[float, float], title: str, *, columns: tuple = ()
) -> tuple[Any, Any, Any]:
    """``(fig, ax, df)`` for a plot of per-request records (:func:`access.as_frame`);
    ``df`` is None, and "no data" drawn under ``title``, when there are no records
    or they lack one of ``columns``."""
    from . import access

    fig, ax = new_axes(ax, figsize)
    df = access.as_frame(records)
    if df.height == 0 or any(c not in df.columns for c in columns):
        draw_no_data(ax, title)
        return fig, ax, None
    return fig, ax, df


def plot_hit_ratio_over_time(records: Any, ax: Any = None, *, window_s: float | None = None) -> Any:
    """Token and request hit ratios per arrival window (lines), requests per window (bars)."""
    from . import access

    title = "Hit ratio over time"
    fig, ax, df = records_axes(records, ax, (10, 5), title)
    if df is None:
        return fig
    tl = access.hit_ratio_over_time(df, window_s=window_s)
    x = tl["window_start_s"].to_numpy()
    width = float(x[1] - x[0]) if len(x) > 1 else 1.0
    bars = ax.twinx()
    bars.bar(x, tl["requests"], width=width, align="edge", color="#ddd", label="requests")
    bars.set_ylabel("requests per window")
    ax.set_zorder(bars.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot(x + width / 2, tl["token_hit_ratio"], marker="o", ms=3, label="token hit ratio")
    ax.plot(x + width / 2, tl["request_hit_ratio"], ls=":", color="grey", label="request hit ratio")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("arrival time (s, window start)")
    ax.set_ylabel("hit ratio")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return fig


def plot_hit_vs_prompt_length(records: Any, ax: Any = None) -> Any:
    """Token hit ratio per prompt-length bucket, with the request count of each."""
    from . import access

    title = "Token hit ratio by prompt length"
    fig, ax, df = records_axes(records, ax, (10, 5), title)
    if df is None:
        return fig
    b = access.hit_ratio_by_prompt_length(df)
    x = list(range(b.height))
    ratio = b["token_hit_ratio"].fill_null(0).to_numpy()
    ax.bar(x, ratio, color="#2a9d8f")
    ax.set_xticks(x, b["bucket"].to_list(), rotation=45, ha="right")
    for xi, (r, n) in enumerate(zip(ratio, b["requests"].to_list())):
        ax.annotate(
            f"n={n}",
            (xi, r),
            ha="center",
            va="bottom",
            fontsize=7,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("token hit ratio")
    ax.set_title(title)
    return fig


def plot_session_reuse(records: Any, ax: Any = None, *, inferred: bool = False) -> Any:
    """Token hit ratio by turn within a session (``session_id``, ``turn`` columns)."""
    from . import access

    title = "Reuse by session turn" + (" (sessions inferred from first block)" if inferred else "")
    fig, ax, df = records_axes(records, ax, (10, 5), title, columns=("session_id",))
    if df is None:
        return fig
    s = access.session_reuse(df)
    x = list(range(s.height))
    ax.bar(x, s["token_hit_ratio"].fill_null(0).to_numpy(), color="#457b9d")
    ax.set_xticks(x, s["label"].to_list())
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("turn within session")
    ax.set_ylabel("token hit ratio")
    counts = ax.twinx()
    counts.plot(x, s["requests"].to_numpy(), color="#e76f51", marker="o", ms=3, label="requests")
    counts.set_ylabel("requests")
    counts.set_ylim(bottom=0)
    counts.legend(loc="upper right")
    ax.set_title(title)
    return fig


def plot_cache_footprint(
    records: Any, ax: Any = None, *, capacity_blocks: int | None = None
) -> Any:
    """Blocks held by the cache after each request (inserted minus evicted), capacity dashed."""
    from . import access

    title = "Cache footprint over time"
    fig, ax, df = records_axes(records, ax, (10, 5), title)
    if df is None:
        return fig
    fp = access.cache_footprint(df)
    ax.step(fp["arrival_s"], fp["cached_blocks"], where="post", label="blocks cached")
    ax.step(
        fp["arrival_s"],
        fp["evicted_blocks"],
        where="post",
        alpha=0.6,
        label="blocks evicted (cumulative)",
    )
    draw_capacity(ax, capacity_blocks)
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("blocks")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return fig


def plot_reuse_cdf(events: Any, ax: Any = None, *, by: str = "distance") -> Any:
    """CDF of reuse distances (``by="distance"``) or reuse times (``by="time"``), log x."""
    from . import access

    fig, ax = new_axes(ax, (9, 5))
    title = "Reuse distance CDF" if by == "distance" else "Reuse time CDF"
    cdf = access.reuse_cdf(events, by=by)
    if cdf.height == 0:
        draw_no_data(ax, title)
        return fig
    # distance 0 (immediate reuse) is drawn at 0.5 so the log axis shows it
    x = cdf["value"].clip(lower_bound=0.5 if by == "distance" else 1e-6).to_numpy()
    ax.step(x, cdf["fraction"].to_numpy(), where="post", color="#264653")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(
        "reuse distance (distinct blocks between reuses, log)"
        if by == "distance"
        else "reuse time (s between accesses, log)"
    )
    ax.set_ylabel("fraction of reuses")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return fig
