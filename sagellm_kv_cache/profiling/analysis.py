"""DataFrame analyses of an access table (polars expressions, no row loops).

Every function takes the event table of
:meth:`~sagellm_kv_cache.profiling.AccessStatsCollector.to_polars` (a
``polars.DataFrame``; a ``pandas.DataFrame`` with the same columns is
converted) and returns a small ``polars.DataFrame`` ready to plot::

    events = AccessStatsCollector.load("stats.json").to_polars()
    timeline = hit_miss_timeline(events)            # window, hits, misses, hit_ratio
    heat = access_heatmap(events, by="block")       # row x window -> accesses

Time windows start at the first access; ``window_s=None`` picks a round
width giving about 40 windows (:func:`auto_window_s`).

This module imports polars at import time; ``sagellm_kv_cache`` never
imports it, so the library stays light.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from .collector import AccessStatsCollector
from .reuse import previous_access_index, reuse_distances

__all__ = [
    "access_heatmap",
    "as_polars",
    "auto_window_s",
    "hit_miss_timeline",
    "hit_ratio_by_position",
    "hottest_blocks",
    "load_events",
    "reuse_distance_histogram",
    "with_reuse_distance",
    "with_window",
]

_TARGET_WINDOWS = 40


def load_events(path: Any) -> pl.DataFrame:
    """The event table of a ``.json`` / ``.parquet`` export (see ``AccessStatsCollector.load``)."""
    return AccessStatsCollector.load(path).to_polars()


def as_polars(df: Any) -> pl.DataFrame:
    """``df`` as a polars DataFrame (pandas input is converted)."""
    if isinstance(df, pl.DataFrame):
        return df
    if isinstance(df, AccessStatsCollector):
        return df.to_polars()
    return pl.from_pandas(df)


def auto_window_s(df: Any, target_windows: int = _TARGET_WINDOWS) -> float:
    """A round window width (1, 2 or 5 x 10^k seconds) giving about ``target_windows`` windows."""
    df = as_polars(df)
    if df.height == 0:
        return 1.0
    duration = float(df["timestamp"].max() - df["timestamp"].min())
    if duration <= 0:
        return 1.0
    raw = duration / target_windows
    exp = math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        width = mult * 10.0**exp
        if width >= raw:
            return width
    return 10.0 ** (exp + 1)  # pragma: no cover - the loop always returns


def with_window(df: Any, window_s: float | None = None) -> pl.DataFrame:
    """Add ``window`` (int, 0 = first) and ``window_start_s`` columns."""
    df = as_polars(df)
    width = auto_window_s(df) if window_s is None else float(window_s)
    t0 = df["timestamp"].min() if df.height else 0.0
    window = ((pl.col("timestamp") - t0) / width).floor().cast(pl.Int64)
    return df.with_columns(window.alias("window")).with_columns(
        (pl.col("window").cast(pl.Float64) * width).alias("window_start_s")
    )


def access_heatmap(
    df: Any, *, by: str = "block", window_s: float | None = None, max_rows: int = 64
) -> pl.DataFrame:
    """Access counts per (row, time window), long format.

    Args:
        df: the event table.
        by: ``"block"``: rows are blocks ranked by popularity (rank 1 = most
            accessed); with more than ``max_rows`` blocks, consecutive ranks
            are grouped so there are at most ``max_rows`` rows.
            ``"position"``: rows are prompt positions (grouped into equal
            ranges beyond ``max_rows``).
        window_s: window width in seconds (default :func:`auto_window_s`).
        max_rows: most rows in the result.

    Returns:
        Columns ``row`` (0 = hottest / first), ``row_label``, ``window``,
        ``window_start_s``, ``accesses``; only non-zero cells.
    """
    if by not in ("block", "position"):
        raise ValueError(f"by must be 'block' or 'position', got {by!r}")
    df = with_window(df, window_s)
    if by == "block":
        ranks = (
            df.group_by("block_code")
            .agg(pl.len().alias("n"))
            .sort(["n", "block_code"], descending=[True, False])
            .with_row_index("rank")
        )
        num = ranks.height
        per_row = max(1, math.ceil(num / max_rows))
        ranks = ranks.with_columns((pl.col("rank") // per_row).cast(pl.Int64).alias("row"))
        label = _range_label(
            pl.col("row") * per_row + 1, pl.min_horizontal((pl.col("row") + 1) * per_row, num), "#"
        )
        df = df.join(ranks.select("block_code", "row"), on="block_code", how="left")
        labels = ranks.select("row").unique().with_columns(label.alias("row_label"))
        if per_row == 1:  # one block per row: show its id
            labels = ranks.join(
                df.select("block_code", "block_id").unique("block_code"), on="block_code"
            ).select("row", pl.col("block_id").cast(pl.String).alias("row_label"))
    else:
        df = df.filter(pl.col("position").is_not_null())
        max_pos = int(df["position"].max()) if df.height else 0
        per_row = max(1, math.ceil((max_pos + 1) / max_rows))
        df = df.with_columns((pl.col("position") // per_row).cast(pl.Int64).alias("row"))
        labels = (
            df.select("row")
            .unique()
            .with_columns(
                _range_label(pl.col("row") * per_row, (pl.col("row") + 1) * per_row - 1, "").alias(
                    "row_label"
                )
            )
        )
    counts = df.group_by("row", "window", "window_start_s").agg(
        pl.len().cast(pl.Int64).alias("accesses")
    )
    return (
        counts.join(labels, on="row", how="left")
        .select("row", "row_label", "window", "window_start_s", "accesses")
        .sort("row", "window")
    )


def _range_label(lo: pl.Expr, hi: pl.Expr, prefix: str) -> pl.Expr:
    lo_s = pl.lit(prefix) + lo.cast(pl.String)
    return pl.when(lo == hi).then(lo_s).otherwise(lo_s + pl.lit("-") + hi.cast(pl.String))


def hit_miss_timeline(df: Any, *, window_s: float | None = None) -> pl.DataFrame:
    """Hits, misses and block hit ratio per time window (empty windows included).

    Returns:
        Columns ``window``, ``window_start_s``, ``accesses``, ``hits``,
        ``misses``, ``hit_ratio`` (0.0 for an empty window).
    """
    df = as_polars(df)
    width = auto_window_s(df) if window_s is None else float(window_s)
    df = with_window(df, width)
    per = df.group_by("window").agg(
        pl.len().cast(pl.Int64).alias("accesses"),
        pl.col("is_hit").sum().cast(pl.Int64).alias("hits"),
    )
    num = int(df["window"].max()) + 1 if df.height else 0
    full = pl.DataFrame({"window": pl.arange(0, num, eager=True).cast(pl.Int64)})
    return (
        full.join(per, on="window", how="left")
        .with_columns(pl.col("accesses", "hits").fill_null(0))
        .with_columns(
            (pl.col("window").cast(pl.Float64) * width).alias("window_start_s"),
            (pl.col("accesses") - pl.col("hits")).alias("misses"),
            pl.when(pl.col("accesses") > 0)
            .then(pl.col("hits") / pl.col("accesses"))
            .otherwise(0.0)
            .alias("hit_ratio"),
        )
        .select("window", "window_start_s", "accesses", "hits", "misses", "hit_ratio")
    )


def with_reuse_distance(df: Any) -> pl.DataFrame:
    """Add ``reuse_distance`` (distinct other blocks since the previous access
    to the same block; null for a first access) in row order."""
    df = as_polars(df)
    codes = df["block_code"].to_numpy()
    dist = reuse_distances(codes, previous_access_index(codes))
    col = pl.Series("reuse_distance", dist, dtype=pl.Int64)
    return df.with_columns(pl.when(col >= 0).then(col).otherwise(None).alias("reuse_distance"))


def reuse_distance_histogram(df: Any) -> pl.DataFrame:
    """Reuse distances in power-of-two bins ``0, 1, 2-3, 4-7, ...``.

    Returns:
        Columns ``bin_lo``, ``bin_hi``, ``count``, ``fraction`` (of reuses),
        one row per bin from 0 to the largest; empty when nothing was reused.
    """
    d = with_reuse_distance(df).select(pl.col("reuse_distance").drop_nulls())
    if d.height == 0:
        return pl.DataFrame(
            schema={
                "bin_lo": pl.Int64,
                "bin_hi": pl.Int64,
                "count": pl.Int64,
                "fraction": pl.Float64,
            }
        )
    binned = d.select(
        pl.when(pl.col("reuse_distance") == 0)
        .then(0)
        .otherwise(pl.col("reuse_distance").log(2).floor().cast(pl.Int64) + 1)
        .alias("bin")
    )
    counts = binned.group_by("bin").agg(pl.len().cast(pl.Int64).alias("count"))
    num_bins = int(counts["bin"].to_numpy().max()) + 1
    bins = pl.DataFrame({"bin": np.arange(num_bins, dtype=np.int64)})
    return (
        bins.join(counts, on="bin", how="left")
        .with_columns(pl.col("count").fill_null(0))
        .with_columns(
            pl.when(pl.col("bin") == 0)
            .then(0)
            .otherwise(pl.lit(2).pow(pl.col("bin") - 1))
            .cast(pl.Int64)
            .alias("bin_lo"),
            pl.when(pl.col("bin") == 0)
            .then(0)
            .otherwise(pl.lit(2).pow(pl.col("bin")) - 1)
            .cast(pl.Int64)
            .alias("bin_hi"),
            (pl.col("count") / pl.col("count").sum()).alias("fraction"),
        )
        .select("bin_lo", "bin_hi", "count", "fraction")
    )


def hottest_blocks(df: Any, n: int = 10) -> pl.DataFrame:
    """The ``n`` most accessed blocks (ties: first seen first).

    Returns:
        Columns ``block_id``, ``accesses``, ``hits``, ``hit_ratio``.
    """
    df = as_polars(df)
    return (
        df.group_by("block_code")
        .agg(
            pl.col("block_id").first(),
            pl.len().cast(pl.Int64).alias("accesses"),
            pl.col("is_hit").sum().cast(pl.Int64).alias("hits"),
        )
        .sort(["accesses", "block_code"], descending=[True, False])
        .head(n)
        .with_columns((pl.col("hits") / pl.col("accesses")).alias("hit_ratio"))
        .select("block_id", "accesses", "hits", "hit_ratio")
    )


def hit_ratio_by_position(df: Any, *, bucket_width: int | None = None) -> pl.DataFrame:
    """Block hit ratio per prompt-position bucket.

    Args:
        df: the event table (rows without a position are ignored).
        bucket_width: equal buckets of this many positions; default
            power-of-two buckets ``0, 1, 2-3, 4-7, ...`` (as in the summary).

    Returns:
        Columns ``bucket`` (label), ``position_lo``, ``position_hi``,
        ``accesses``, ``hits``, ``hit_ratio``; only non-empty buckets.
    """
    df = as_polars(df).filter(pl.col("position").is_not_null())
    if bucket_width is None:
        lo = _pow2_floor(pl.col("position"))
        hi = pl.when(lo == 0).then(0).otherwise(lo * 2 - 1)
    else:
        if bucket_width <= 0:
            raise ValueError(f"bucket_width must be > 0, got {bucket_width}")
        lo = (pl.col("position") // bucket_width) * bucket_width
        hi = lo + bucket_width - 1
    return (
        df.with_columns(lo.alias("position_lo"), hi.alias("position_hi"))
        .group_by("position_lo", "position_hi")
        .agg(
            pl.len().cast(pl.Int64).alias("accesses"),
            pl.col("is_hit").sum().cast(pl.Int64).alias("hits"),
        )
        .sort("position_lo")
        .with_columns(
            _range_label(pl.col("position_lo"), pl.col("position_hi"), "").alias("bucket"),
            (pl.col("hits") / pl.col("accesses")).alias("hit_ratio"),
        )
        .select("bucket", "position_lo", "position_hi", "accesses", "hits", "hit_ratio")
    )


def _pow2_floor(x: pl.Expr) -> pl.Expr:
    """Largest power of two <= x (0 for 0)."""
    return (
        pl.when(x <= 0)
        .then(0)
        .otherwise(pl.lit(2).pow(x.cast(pl.Float64).log(2).floor()).cast(pl.Int64))
    )
