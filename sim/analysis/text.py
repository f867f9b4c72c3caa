"""Plain-text tables of summaries (what ``visualize --summary`` prints)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_run_summary", "format_summary"]


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of the main numbers of ``AccessStatsCollector.get_stats_summary()``."""
    rd, rt = summary["reuse_distance"], summary["reuse_time_s"]
    rows = [
        ("Total accesses", f"{summary['total_accesses']}"),
        ("Hits", f"{summary['hits']}"),
        ("Misses", f"{summary['misses']}"),
        ("Hit rate", f"{summary['hit_rate']:.2%}"),
        ("Unique blocks", f"{summary['unique_blocks']}"),
        ("Unique requests", f"{summary['unique_requests']}"),
        ("Duration (s)", f"{summary['duration_s']:.3f}"),
        ("Accesses per second", f"{summary['accesses_per_s']:.1f}"),
        ("Reuses / cold accesses", f"{rd['count']} / {rd['cold']}"),
        ("Reuse distance p50/p90/p99", "/".join(f"{v:g}" for v in rd["percentiles"].values())),
        ("Reuse time p50/p90/p99 (s)", "/".join(f"{v:.3g}" for v in rt["percentiles"].values())),
        ("Evictions", f"{summary['evictions']['total']}"),
    ]
    for name, w in summary.get("time_windows", {}).items():
        acc = w["accesses"]
        if acc:
            rows.append(
                (f"Accesses per {name} window (mean/max)", f"{sum(acc) / len(acc):.1f}/{max(acc)}")
            )
    width = max(len(r[0]) for r in rows)
    lines = ["KV access statistics", "=" * (width + 14)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    if summary["hottest_blocks"]:
        lines += ["", "Hottest blocks (accesses, hits):"]
        lines += [
            f"  {b['block_id']!s:<20} {b['accesses']:>8} {b['hits']:>8}"
            for b in summary["hottest_blocks"]
        ]
    if summary["hit_rate_by_position"]:
        lines += ["", "Hit rate by prompt position (block index):"]
        lines += [
            f"  {p['bucket']:<12} {p['hit_rate']:>7.1%}  ({p['accesses']} accesses)"
            for p in summary["hit_rate_by_position"]
        ]
    return "\n".join(lines)


def format_run_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of the scalar numbers of a run's ``summary.json``."""
    rows = [(k, v) for k, v in summary.items() if isinstance(v, (int, float, str, bool))]
    if not rows:
        return "Run summary: (empty)"
    width = max(len(k) for k, _ in rows)
    lines = ["Run summary", "=" * (width + 14)]
    lines += [
        f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows
    ]
    return "\n".join(lines)
