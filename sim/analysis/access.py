"""DataFrame analyses of a run: block accesses derived from a trace, and per-request tables.

Two levels, both polars (imported inside each function):

* block accesses: the event table of
  :meth:`~sagellm_kv_cache.profiling.AccessStatsCollector.to_polars`
  (``timestamp``, ``block_id``, ``block_code``, ``is_hit``, ``request_id``,
  ``position``, ``tier``, ``size_bytes``). A replay can record it
  (``accesses.parquet``); :func:`accesses_from_trace` derives the same table
  from a trace's ``block_hashes`` and, when given, a replay's per-request
  ``hit_blocks`` (a lookup stops at the first miss, so the first ``hit_blocks``
  full blocks of a request hit and the rest miss). Without records the hits are
  those of an infinite cache (a block hits when an earlier request touched it
  and every block before it in the prompt hit too)::

      request r (full blocks)   h0  h1  h2  h3
      position                   0   1   2   3
      is_hit (hit_blocks = 2)    T   T   F   F

* requests: one row per request with at least ``arrival_s``, ``input_length``,
  ``full_blocks``, ``hit_blocks`` (a replay's ``records.parquet``, or
  :func:`requests_from_accesses`). :func:`hit_ratio_over_time`,
  :func:`hit_ratio_by_prompt_length`, :func:`session_reuse` and
  :func:`cache_footprint` reduce it to small tables ready to plot.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DEFAULT_MAX_ACCESSES",
    "accesses_from_trace",
    "cache_footprint",
    "hit_ratio_by_prompt_length",
    "hit_ratio_over_time",
    "requests_from_accesses",
    "reuse_cdf",
    "session_reuse",
    "with_sessions",
]

#: accesses derived from a trace stop after the request that crosses this count
DEFAULT_MAX_ACCESSES = 4_000_000
_CDF_POINTS = 2000


def _pl() -> Any:
    import polars as pl

    return pl


def as_frame(df: Any) -> Any:
    pl = _pl()
    if isinstance(df, pl.DataFrame):
        return df
    from sagellm_kv_cache.profiling import analysis

    return analysis.as_polars(df)


def _first_seen_codes(ids: Any) -> Any:
    """Dense codes numbering the distinct values of ``ids`` by first appearance."""
    import numpy as np

    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq), dtype=np.int64)
    return rank[inverse.reshape(-1)]


def accesses_from_trace(
    table: Any, records: Any = None, *, max_accesses: int = DEFAULT_MAX_ACCESSES
) -> Any:
    """The block-access table of a trace: one row per full prompt block, in request order.

    Args:
        table: a canonical trace table (``traces.read_trace``).
        records: a replay's per-request table (``request_id``, ``hit_blocks``);
            None: the hits of an infinite cache.
        max_accesses: stop after the request that crosses this many accesses.

    Returns:
        The collector's event table (``tier`` and ``size_bytes`` null), block
        ids the trace's block hashes, timestamps the arrival times.
    """
    import numpy as np

    pl = _pl()
    if max_accesses < 1:
        from sagellm_kv_cache.errors import KVInvalidInputError

        raise KVInvalidInputError(f"max_accesses must be >= 1, got {max_accesses}")
    block_size = int(table["block_size"][0]) if table.height else 1
    full = (table["input_length"] // block_size).clip(lower_bound=0)
    lengths = np.minimum(table["block_hashes"].list.len().to_numpy(), full.to_numpy())
    cum = np.cumsum(lengths)
    keep = int(np.searchsorted(cum, max_accesses)) + 1 if len(cum) else 0
    table, lengths = table.head(keep), lengths[:keep]
    req_idx = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(len(req_idx), dtype=np.int64) - starts
    # the first ``lengths[i]`` hashes of each request: slice the lists, then flatten
    hashes = (
        table.with_columns(pl.Series("_n", lengths))
        .select(pl.col("block_hashes").list.head(pl.col("_n")))
        .to_series()
        .explode()
        .drop_nulls()
    )
    ids = hashes.cast(pl.Int64).to_numpy()
    ev = pl.DataFrame(
        {
            "req_idx": req_idx,
            "timestamp": table["arrival_s"].cast(pl.Float64).to_numpy()[req_idx],
            "block_id": ids,
            "block_code": _first_seen_codes(ids),
            "position": positions,
        }
    ).with_columns(pl.Series("request_id", table["request_id"].cast(pl.String)).gather(req_idx))
    if records is None:
        seen = (pl.col("req_idx").min().over("block_code") < pl.col("req_idx")).cast(pl.Int8)
        ev = ev.with_columns(seen.alias("_seen"))
        hit = pl.col("_seen").cum_min().over("req_idx").cast(pl.Boolean)
    else:
        hits = as_frame(records).select(
            pl.col("request_id").cast(pl.String), pl.col("hit_blocks").alias("_hit_blocks")
        )
        ev = ev.join(hits, on="request_id", how="inner", maintain_order="left")
        hit = pl.col("position") < pl.col("_hit_blocks")
    return ev.select(
        "timestamp",
        "block_id",
        "block_code",
        hit.alias("is_hit"),
        "request_id",
        "position",
        pl.lit(None, dtype=pl.String).alias("tier"),
        pl.lit(None, dtype=pl.Int64).alias("size_bytes"),
    )


def requests_from_accesses(events: Any, table: Any) -> Any:
    """Per-request table (``hit_blocks``, ``full_blocks``, ``hit_tokens``) of an access table.

    ``table`` (the trace) gives ``arrival_s``, ``input_length`` and the session columns.
    """
    pl = _pl()
    block_size = int(table["block_size"][0]) if table.height else 1
    per = (
        as_frame(events)
        .group_by("request_id", maintain_order=True)
        .agg(
            pl.len().cast(pl.Int64).alias("full_blocks"),
            pl.col("is_hit").sum().cast(pl.Int64).alias("hit_blocks"),
        )
    )
    cols = [c for c in ("session_id", "turn") if c in table.columns]
    base = table.select(pl.col("request_id").cast(pl.String), "arrival_s", "input_length", *cols)
    return (
        base.join(per, on="request_id", how="left", maintain_order="left")
        .with_columns(pl.col("full_blocks", "hit_blocks").fill_null(0))
        .with_columns((pl.col("hit_blocks") * block_size).alias("hit_tokens"))
    )


def with_sessions(records: Any, table: Any = None) -> tuple[Any, bool]:
    """``records`` with ``session_id`` and ``turn`` columns, and whether they were inferred.

    Taken from the records or the trace when either has them; otherwise a
    session is inferred as the requests sharing a first block hash (a system
    prompt or a conversation's opening), turns numbered by arrival.
    """
    pl = _pl()
    records = as_frame(records)
    if "session_id" in records.columns and "turn" in records.columns:
        return records, False
    if table is not None and "session_id" in table.columns:
        sess = table.select(
            pl.col("request_id").cast(pl.String),
            "session_id",
            *(["turn"] if "turn" in table.columns else []),
        )
        out = records.drop([c for c in ("session_id", "turn") if c in records.columns]).join(
            sess, on="request_id", how="left", maintain_order="left"
        )
        if "turn" not in out.columns:
            out = out.with_columns(
                (pl.int_range(pl.len()).over("session_id") + 1).cast(pl.Int64).alias("turn")
            )
        return out, False
    if table is None or "block_hashes" not in table.columns:
        return records, True
    first = table.select(
        pl.col("request_id").cast(pl.String),
        pl.col("block_hashes").list.first().cast(pl.String).alias("session_id"),
    )
    out = records.join(first, on="request_id", how="left", maintain_order="left")
    out = out.with_columns(
        (pl.int_range(pl.len()).over("session_id") + 1).cast(pl.Int64).alias("turn")
    )
    return out, True


def _ratio(num: Any, den: Any) -> Any:
    pl = _pl()
    return pl.when(den > 0).then(num / den).otherwise(None)


def hit_ratio_over_time(records: Any, *, window_s: float | None = None) -> Any:
    """Token and request hit ratios per arrival-time window.

    Returns:
        ``window_start_s``, ``requests``, ``prompt_tokens``, ``hit_tokens``,
        ``token_hit_ratio``, ``request_hit_ratio``; only windows with arrivals.
    """
    from sagellm_kv_cache.profiling import analysis

    pl = _pl()
    df = as_frame(records).with_columns(pl.col("arrival_s").alias("timestamp"))
    df = analysis.with_window(df, window_s)
    return (
        df.group_by("window_start_s")
        .agg(
            pl.len().cast(pl.Int64).alias("requests"),
            pl.col("input_length").sum().cast(pl.Int64).alias("prompt_tokens"),
            pl.col("hit_tokens").sum().cast(pl.Int64).alias("hit_tokens"),
            (pl.col("hit_blocks") > 0).mean().alias("request_hit_ratio"),
        )
        .sort("window_start_s")
        .with_columns(
            _ratio(pl.col("hit_tokens"), pl.col("prompt_tokens")).alias("token_hit_ratio")
        )
    )


def hit_ratio_by_prompt_length(records: Any) -> Any:
    """Token hit ratio per prompt-length bucket (powers of two of tokens).

    Returns:
        ``length_lo``, ``length_hi``, ``bucket`` (label), ``requests``,
        ``prompt_tokens``, ``hit_tokens``, ``token_hit_ratio``.
    """
    pl = _pl()
    df = as_frame(records)
    lo = (
        pl.when(pl.col("input_length") <= 1)
        .then(0)
        .otherwise(pl.lit(2).pow(pl.col("input_length").cast(pl.Float64).log(2).floor()))
        .cast(pl.Int64)
    )
    out = (
        df.with_columns(lo.alias("length_lo"))
        .group_by("length_lo")
        .agg(
            pl.len().cast(pl.Int64).alias("requests"),
            pl.col("input_length").sum().cast(pl.Int64).alias("prompt_tokens"),
            pl.col("hit_tokens").sum().cast(pl.Int64).alias("hit_tokens"),
        )
        .sort("length_lo")
        .with_columns(
            pl.when(pl.col("length_lo") == 0)
            .then(1)
            .otherwise(pl.col("length_lo") * 2 - 1)
            .alias("length_hi"),
            _ratio(pl.col("hit_tokens"), pl.col("prompt_tokens")).alias("token_hit_ratio"),
        )
    )
    return out.with_columns(
        pl.format("{}-{}", pl.col("length_lo"), pl.col("length_hi")).alias("bucket")
    ).select(
        "length_lo",
        "length_hi",
        "bucket",
        "requests",
        "prompt_tokens",
        "hit_tokens",
        "token_hit_ratio",
    )


def session_reuse(records: Any, *, max_turn: int = 16) -> Any:
    """Reuse by turn within a session (``records`` with ``session_id`` and ``turn``).

    Turns beyond ``max_turn`` share the last row (labelled ``>=max_turn``).

    Returns:
        ``turn``, ``label``, ``requests``, ``sessions``, ``token_hit_ratio``.
    """
    pl = _pl()
    df = as_frame(records).filter(pl.col("session_id").is_not_null())
    turn = pl.col("turn").clip(upper_bound=max_turn)
    return (
        df.with_columns(turn.alias("turn_bucket"))
        .group_by("turn_bucket")
        .agg(
            pl.len().cast(pl.Int64).alias("requests"),
            pl.col("session_id").n_unique().cast(pl.Int64).alias("sessions"),
            pl.col("input_length").sum().alias("_prompt"),
            pl.col("hit_tokens").sum().alias("_hit"),
        )
        .sort("turn_bucket")
        .select(
            pl.col("turn_bucket").alias("turn"),
            pl.when(pl.col("turn_bucket") >= max_turn)
            .then(pl.format(">={}", pl.col("turn_bucket")))
            .otherwise(pl.col("turn_bucket").cast(pl.String))
            .alias("label"),
            "requests",
            "sessions",
            _ratio(pl.col("_hit"), pl.col("_prompt")).alias("token_hit_ratio"),
        )
    )


def cache_footprint(records: Any) -> Any:
    """Blocks held by the cache after each request: inserted (misses) minus evicted.

    Rejected requests (``rejected`` true) insert nothing. Without an
    ``evicted_blocks`` column (an infinite cache) nothing leaves.

    Returns:
        ``arrival_s``, ``cached_blocks``, ``inserted_blocks``, ``evicted_blocks`` (cumulative).
    """
    pl = _pl()
    df = as_frame(records)
    ran = ~pl.col("rejected") if "rejected" in df.columns else pl.lit(True)
    inserted = pl.when(ran).then(pl.col("full_blocks") - pl.col("hit_blocks")).otherwise(0)
    evicted = pl.col("evicted_blocks") if "evicted_blocks" in df.columns else pl.lit(0)
    return df.select(
        "arrival_s",
        inserted.cum_sum().cast(pl.Int64).alias("inserted_blocks"),
        evicted.cum_sum().cast(pl.Int64).alias("evicted_blocks"),
    ).with_columns((pl.col("inserted_blocks") - pl.col("evicted_blocks")).alias("cached_blocks"))


def reuse_cdf(events: Any, *, by: str = "distance", max_points: int = _CDF_POINTS) -> Any:
    """Empirical CDF of reuse distances (distinct blocks between two accesses of a
    block) or reuse times (seconds), over reuses only.

    Returns:
        ``value``, ``fraction`` (of reuses with at most ``value``), at most
        ``max_points`` rows (evenly spaced quantiles); empty when nothing was reused.
    """
    import numpy as np

    from sagellm_kv_cache.profiling.reuse import (
        previous_access_index,
        reuse_distances,
        reuse_times,
    )

    pl = _pl()
    if by not in ("distance", "time"):
        from sagellm_kv_cache.errors import KVInvalidInputError

        raise KVInvalidInputError(f"by must be 'distance' or 'time', got {by!r}")
    df = as_frame(events)
    codes = df["block_code"].to_numpy()
    prev = previous_access_index(codes)
    if by == "distance":
        values = reuse_distances(codes, prev)
        values = values[values >= 0].astype(np.float64)
    else:
        values = reuse_times(df["timestamp"].to_numpy().astype(np.float64), prev)
        values = values[~np.isnan(values)]
    values = np.sort(values)
    n = len(values)
    if n == 0:
        return pl.DataFrame(schema={"value": pl.Float64, "fraction": pl.Float64})
    idx = np.unique(np.linspace(0, n - 1, min(n, max_points)).astype(np.int64))
    return pl.DataFrame({"value": values[idx], "fraction": (idx + 1) / n})
