"""Summary statistics of recorded accesses (what ``get_stats_summary`` returns).

Everything works on a collector snapshot: a dict of numpy columns (``block``,
``timestamp``, ``is_hit``, ``request``, ``position`` as codes and values, -1
missing) plus the interned keys and the eviction columns; see
:meth:`AccessStatsCollector.snapshot <sagellm_kv_cache.profiling.AccessStatsCollector.snapshot>`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .interning import id_to_json
from .reuse import previous_access_index, reuse_distances, reuse_times

__all__ = ["position_bucket_edges", "summarize"]

_NUM_HOTTEST = 10
_PERCENTILES = (50, 90, 99)


def position_bucket_edges(max_position: int) -> list[int]:
    """Lower edges of the power-of-two position buckets ``0, 1, 2-3, 4-7, ...``.

    Args:
        max_position: the largest position to cover.

    Returns:
        ``[0, 1, 2, 4, 8, ...]`` up to the bucket holding ``max_position``.
    """
    edges = [0]
    lo = 1
    while lo <= max_position:
        edges.append(lo)
        lo *= 2
    return edges


def _bucket_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {f"p{q}": 0.0 for q in _PERCENTILES}
    return {f"p{q}": float(v) for q, v in zip(_PERCENTILES, np.percentile(values, _PERCENTILES))}


def summarize(s: dict[str, Any], time_windows: dict[str, float]) -> dict[str, Any]:
    """The summary of a snapshot ``s`` (layout: ``AccessStatsCollector.get_stats_summary``)."""
    blocks, ts, hits = s["block"], s["timestamp"], s["is_hit"]
    n = len(blocks)
    num_hits = int(hits.sum())
    start = float(ts.min()) if n else 0.0
    end = float(ts.max()) if n else 0.0
    duration = end - start
    unique_blocks = len(np.unique(blocks)) if n else 0
    summary: dict[str, Any] = {
        "total_accesses": n,
        "hits": num_hits,
        "misses": n - num_hits,
        "hit_rate": num_hits / n if n else 0.0,
        "unique_blocks": unique_blocks,
        "unique_requests": len(np.unique(s["request"][s["request"] >= 0])) if n else 0,
        "start_s": start,
        "end_s": end,
        "duration_s": duration,
        "accesses_per_s": n / duration if duration > 0 else 0.0,
    }

    windows = {}
    for name, width in time_windows.items():
        if n:
            idx = ((ts - start) // width).astype(np.int64)
            num = int(idx.max()) + 1
            acc = np.bincount(idx, minlength=num)
            hit = np.bincount(idx, weights=hits, minlength=num).astype(np.int64)
        else:
            num, acc, hit = 0, np.zeros(0, np.int64), np.zeros(0, np.int64)
        rate = np.divide(hit, acc, out=np.zeros(len(acc)), where=acc > 0)
        windows[name] = {
            "window_s": float(width),
            "num_windows": num,
            "start_s": (start + width * np.arange(num)).tolist(),
            "accesses": acc.tolist(),
            "hits": hit.tolist(),
            "hit_rate": rate.tolist(),
        }
    summary["time_windows"] = windows

    prev = previous_access_index(blocks)
    dist = reuse_distances(blocks, prev)
    reused = dist[dist >= 0]
    hist: dict[str, list[int]] = {"bin_lo": [], "bin_hi": [], "count": []}
    if len(reused):
        # bins [0], [1], [2,3], [4,7], ...
        bin_idx = np.where(
            reused == 0, 0, np.floor(np.log2(np.maximum(reused, 1))).astype(np.int64) + 1
        )
        counts = np.bincount(bin_idx)
        bin_lo = [0] + [2 ** (k - 1) for k in range(1, len(counts))]
        bin_hi = [0] + [2**k - 1 for k in range(1, len(counts))]
        hist = {"bin_lo": bin_lo, "bin_hi": bin_hi, "count": counts.tolist()}
    summary["reuse_distance"] = {
        "count": len(reused),
        "cold": int(n - len(reused)),
        "mean": float(reused.mean()) if len(reused) else 0.0,
        "percentiles": _percentiles(reused),
        "histogram": hist,
    }
    rt = reuse_times(ts, prev)
    rt = rt[~np.isnan(rt)]
    summary["reuse_time_s"] = {
        "count": len(rt),
        "mean": float(rt.mean()) if len(rt) else 0.0,
        "percentiles": _percentiles(rt),
    }

    hottest = []
    if n:
        counts = np.bincount(blocks)
        hit_counts = np.bincount(blocks, weights=hits, minlength=len(counts)).astype(np.int64)
        top = np.argsort(-counts, kind="stable")[:_NUM_HOTTEST]
        hottest = [
            {
                "block_id": id_to_json(s["block_keys"][b]),
                "accesses": int(counts[b]),
                "hits": int(hit_counts[b]),
            }
            for b in top.tolist()
            if counts[b] > 0
        ]
    summary["hottest_blocks"] = hottest

    by_pos = []
    pos = s["position"]
    has_pos = pos >= 0
    if has_pos.any():
        p = pos[has_pos]
        h = hits[has_pos]
        edges = position_bucket_edges(int(p.max()))
        bucket = np.searchsorted(np.asarray(edges), p, side="right") - 1
        acc = np.bincount(bucket, minlength=len(edges))
        hit = np.bincount(bucket, weights=h, minlength=len(edges)).astype(np.int64)
        for k, lo in enumerate(edges):
            hi = edges[k + 1] - 1 if k + 1 < len(edges) else max(lo, 2 * lo - 1)
            by_pos.append(
                {
                    "bucket": _bucket_label(lo, hi),
                    "position_lo": lo,
                    "position_hi": hi,
                    "accesses": int(acc[k]),
                    "hits": int(hit[k]),
                    "hit_rate": float(hit[k] / acc[k]) if acc[k] else 0.0,
                }
            )
    summary["hit_rate_by_position"] = by_pos

    summary["evictions"] = {
        "total": len(s["evict_reason"]),
        "by_reason": dict(sorted(Counter(s["evict_reason"]).items())),
    }
    return summary
