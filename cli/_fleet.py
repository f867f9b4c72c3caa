"""Fleet options shared by ``replay`` and ``sweep``: --instances, --router(s), the fleet table."""

from __future__ import annotations

from typing import Any

import click

__all__ = ["fleet_grid", "format_fleet", "global_pool_cb", "router_cb", "split_routers"]


def split_routers(text: str) -> list[str]:
    """``"round-robin,kv-aware:weight=1,temperature=0"`` -> two specs (a ``k=v`` item
    without ``:`` continues the previous router's parameters)."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and out:
            out[-1] += ("," if ":" in out[-1] else ":") + part
        else:
            out.append(part)
    return out


def _parse(spec: str, option: str) -> str:
    from sagellm_kv_cache.errors import KVCacheError
    from sim.routers import parse_router

    try:
        return parse_router(spec).label
    except KVCacheError as err:
        raise click.BadParameter(err.message, param_hint=option) from None


def router_cb(ctx: Any, param: Any, value: str | None) -> str | None:
    return None if value is None else _parse(value, "--router")


def global_pool_cb(ctx: Any, param: Any, value: str | None) -> str | None:
    """``--global-pool``: any capacity the --capacity grammar reads."""
    if value is None:
        return None
    from sagellm_kv_cache.errors import KVCacheError
    from sim.config import parse_capacity

    try:
        parse_capacity(value)
    except KVCacheError as err:
        raise click.BadParameter(err.message, param_hint="--global-pool") from None
    return str(value).strip()


def fleet_grid(grid: dict | None, instances: str | None, routers: str | None) -> dict | None:
    """Add ``instances`` / ``router`` to a sweep grid from ``--instances 1,4,8 --routers ...``."""
    grid = dict(grid or {})
    if instances is not None:
        values = []
        for part in (p.strip() for p in instances.split(",")):
            if not part.isdigit() or not 1 <= int(part) <= 4096:
                raise click.BadParameter(
                    f"expected integers in 1..4096, got {part!r}", param_hint="--instances"
                )
            values.append(int(part))
        grid["instances"] = values
    if routers is not None:
        specs = split_routers(routers)
        if not specs:
            raise click.BadParameter("no router given", param_hint="--routers")
        grid["router"] = [_parse(s, "--routers") for s in specs]
    return grid or None


def format_fleet(s: dict) -> str:
    """The fleet lines of the compact table: bounds, imbalance, one row per instance."""
    lines = [
        f"instances            {s['instances']}  router {s['router']}",
        f"load imbalance       {s['load_imbalance']:.3f} (max/mean prompt tokens)  "
        f"requests {s['request_imbalance']:.3f}",
    ]
    if "all_caches_hit_ratio" in s:
        lines.append(
            f"bounds               all caches {s['all_caches_hit_ratio']:.4f}  best instance "
            f"{s['best_instance_hit_ratio']:.4f}  routed {s['routed_hit_ratio']:.4f}  "
            f"regret {s['regret_hit_ratio']:.4f}"
        )
    if "global_hit_ratio" in s:
        lines.append(
            f"global pool          {s['global_pool_blocks']} blocks  hit ratio from it "
            f"{s['global_hit_ratio']:.4f} (fetched over the link, not recomputed)"
        )
    if "pooled_hit_ratio" in s:
        lines.append(f"one pool of N x C    {s['pooled_hit_ratio']:.4f} (what-if, same policy)")
    per = s.get("per_instance") or []
    if per:
        timed = "ttft_p50_s" in per[0]
        head = ["inst", "requests", "prompt_tok", "tok_hit", "evictions"]
        head += ["peak_blocks", "queue_p99", "ttft_p50", "ttft_p99"] if timed else []
        rows = [head]
        for r in per:
            row = [
                str(r["instance"]),
                str(r["requests"]),
                str(r["prompt_tokens"]),
                f"{r['token_hit_ratio']:.4f}",
                str(r["evictions"]),
            ]
            if timed:
                row += [
                    str(r["peak_blocks_in_use"]),
                    f"{r['queue_p99_s']:.3f}",
                    f"{r['ttft_p50_s']:.3f}",
                    f"{r['ttft_p99_s']:.3f}",
                ]
            rows.append(row)
        widths = [max(len(x[i]) for x in rows) for i in range(len(head))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(x, widths)) for x in rows]
    return "\n".join(lines)
