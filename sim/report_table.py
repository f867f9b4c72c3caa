"""The compact terminal table every replay mode prints (from ``SimResult.summary()``)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_pivot", "format_summary"]


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


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]


def format_pivot(df: Any, capacity_labels: dict | None = None) -> str:
    """The sweep in the terminal: per trace (and setting), policy x capacity of the token
    hit ratio, the best policy per column marked ``*``, then each policy's ratio to OPT
    and to the infinite bound; clocked sweeps add TTFT p50 / p99.

    Args:
        df: ``sim.sweep.sweep``'s frame.
        capacity_labels: capacity in blocks -> the label the user gave (``"10 %"``).
    """
    import polars as pl

    labels = capacity_labels or {}
    out: list[str] = []
    pol = df.filter(pl.col("kind") == "policy")
    bounds = df.filter(pl.col("kind") == "bound")
    for (trace, setting, mode), part in pol.group_by(
        ["trace", "setting", "mode"], maintain_order=True
    ):
        caps = sorted(set(part["capacity_blocks"].to_list()))
        head = [str(labels.get(c, c)) for c in caps]
        bt = bounds.filter(pl.col("trace") == trace)
        bound = {
            (r["policy"], r["capacity_blocks"]): r["token_hit_ratio"]
            for r in bt.iter_rows(named=True)
        }
        val = {(r["policy"], r["capacity_blocks"]): r for r in part.iter_rows(named=True)}
        policies = list(dict.fromkeys(part["policy"].to_list()))
        best = {
            c: max(
                (val[(p, c)]["token_hit_ratio"] for p in policies if (p, c) in val), default=None
            )
            for c in caps
        }
        title = f"{trace}  {mode}" + (f"  {setting}" if setting else "")
        out.append(f"token hit ratio ({title}; * best per capacity)")
        rows = [["policy", *head]]
        for p in policies:
            cells = []
            for c in caps:
                v = val.get((p, c), {}).get("token_hit_ratio")
                cells.append("-" if v is None else f"{v:.4f}{'*' if v == best[c] else ' '}")
            rows.append([p, *cells])
        for b in ("opt", "infinite"):
            if any((b, c) in bound for c in caps):
                rows.append(
                    [b, *(f"{bound[(b, c)]:.4f} " if (b, c) in bound else "-" for c in caps)]
                )
        out += _grid(rows)
        for b in ("opt", "infinite"):
            if not any((b, c) in bound for c in caps):
                continue
            out.append(f"ratio to {b.upper() if b == 'opt' else 'the infinite bound'}")
            rows = [["policy", *head]]
            for p in policies:
                cells = []
                for c in caps:
                    v, ref = val.get((p, c), {}).get("token_hit_ratio"), bound.get((b, c))
                    cells.append(f"{v / ref:.3f}" if v is not None and ref else "-")
                rows.append([p, *cells])
            out += _grid(rows)
        if mode != "sequential" and "ttft_p50_s" in part.columns:
            out.append("TTFT p50 / p99 (s)")
            rows = [["policy", *head]]
            for p in policies:
                rows.append(
                    [
                        p,
                        *(
                            f"{val[(p, c)]['ttft_p50_s']:.3g} / {val[(p, c)]['ttft_p99_s']:.3g}"
                            if (p, c) in val
                            else "-"
                            for c in caps
                        ),
                    ]
                )
            out += _grid(rows)
        out.append("")
    return "\n".join(out).rstrip()
