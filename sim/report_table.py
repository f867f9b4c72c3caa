"""The compact terminal table every replay mode prints (from ``SimResult.summary()``)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_summary"]


def format_summary(s: dict[str, Any]) -> str:
    """A dozen aligned lines: the token hit ratio first, then what the mode measured."""
    lines = [
        f"token_hit_ratio      {s['token_hit_ratio']:.4f}   (hit tokens / prompt tokens)",
        f"block_hit_ratio      {s['block_hit_ratio']:.4f}",
        f"request_hit_ratio    {s['request_hit_ratio']:.4f}   (requests with >= 1 hit block)",
        f"mode                 {s.get('mode')}  policy {s.get('policy')}",
        f"capacity (blocks)    {s.get('capacity_blocks')}",
        f"requests             {s.get('num_requests')}  rejected {s.get('num_rejected', 0)}",
        f"evictions            {s.get('evictions')}",
    ]
    tiers = s.get("per_tier")
    if tiers:
        for t, v in tiers.items():
            lines.append(
                f"  {t:<18} {v['block_hit_ratio']:.4f} block hit ratio  "
                f"({v['hit_blocks']} blocks, capacity {v['capacity_blocks']})"
            )
    if s.get("clock"):
        label = "" if s["clock"] == "simulated" else "  (each request alone)"
        for m in ("queue", "ttft", "tpot", "e2e"):
            if f"{m}_p50_s" in s and not (m == "queue" and s["clock"] != "simulated"):
                lines.append(
                    f"{m + '_s':<20} p50 {s[f'{m}_p50_s']:.4g}  p90 {s[f'{m}_p90_s']:.4g}  "
                    f"p99 {s[f'{m}_p99_s']:.4g}{label}"
                )
        if "throughput_rps" in s:
            lines.append(
                f"throughput           {s['throughput_rps']:.3f} req/s  "
                f"{s['output_tokens_per_s']:.1f} output tok/s  makespan {s['makespan_s']:.3f} s"
            )
    return "\n".join(lines)
