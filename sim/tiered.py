"""Trace replay through a chain of KV tiers, with a modelled time to first token.

``replay_tiered`` drives ``KVOffloadManager`` (metadata-only: the same
bookkeeping as with tensors, no bytes) with one request after another and
models what each request's first token costs::

    ttft = f(load_s, prefill_s)
    load_s    = sum over lower tiers t with hits: latency_t + hit_bytes_t / bandwidth_t
    prefill_s = uncached_tokens / prefill_tokens_per_s
    f         = load_s + prefill_s                       (no overlap)
              = (load_s + prefill_s) / L + (L - 1) / L * max(load_s, prefill_s)
                                                         (layer by layer, L layers: loading
                                                          layer l+1 overlaps computing layer l)
    recompute = prompt_tokens / prefill_tokens_per_s     (no cache at all)

Default links (``LINKS``), per block read into the device:

    host (cpu)   PCIe 4.0 x16, pinned memory       25 GB/s, 10 us per transfer
    disk (nvme)  one PCIe 4.0 NVMe SSD             6 GB/s, 100 us per transfer

and ``prefill_tokens_per_s = 10,000`` (an 8B model on one H100-class GPU),
KV geometry ``llama-3-8b`` (128 KiB per token in bf16). All of these are
overridable through the config (``getattr`` with these defaults).

Sequential mode (``config.sequential``, the default) runs each request alone:
allocate (with onboarding), cache its full blocks, free. Otherwise requests
arrive at ``arrival_s`` and hold their blocks until their modelled finish
(``ttft + output_length * decode_s_per_token``); a request that does not fit
waits for the earliest finishers (its wait counts in its TTFT).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LINKS", "Link", "replay_tiered", "ttft_model"]


@dataclass(frozen=True, slots=True)
class Link:
    """A link from a lower tier into the device: bandwidth and per-transfer latency."""

    bandwidth_bytes_per_s: float
    latency_s: float

    def load_s(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s if num_bytes else 0.0


#: tier name -> default link into the device (see module docstring)
LINKS: dict[str, Link] = {
    "cpu": Link(25e9, 10e-6),
    "host": Link(25e9, 10e-6),
    "disk": Link(6e9, 100e-6),
    "nvme": Link(6e9, 100e-6),
    "ssd": Link(6e9, 100e-6),
}

_DEFAULTS = {
    "block_size": None,
    "sequential": True,
    "policy": "lru",
    "prefill_tokens_per_s": 10_000.0,
    "decode_s_per_token": 0.02,
    "model": "llama-3-8b",
    "layerwise_overlap": True,
    "links": None,
}


def _cfg(config: Any, name: str) -> Any:
    """A setting from a ``ReplayConfig``-like object, tolerant of its field names.

    ``sequential`` also reads ``mode == "sequential"``; ``model`` also reads
    ``model_shape``; ``prefill_tokens_per_s`` / ``decode_s_per_token`` also
    read the ``cost`` model's ``prefill_s_per_token`` / ``decode_s_per_token``.
    """
    if config is None:
        return _DEFAULTS[name]
    if hasattr(config, name):
        value = getattr(config, name)
        return _DEFAULTS[name] if value is None else value
    cost = getattr(config, "cost", None)
    if name == "sequential" and hasattr(config, "mode"):
        return config.mode == "sequential"
    if name == "model" and getattr(config, "model_shape", None):
        return config.model_shape
    if name == "prefill_tokens_per_s" and getattr(cost, "prefill_s_per_token", 0):
        return 1.0 / cost.prefill_s_per_token
    if name == "decode_s_per_token" and cost is not None and hasattr(cost, "decode_s_per_token"):
        return cost.decode_s_per_token
    return _DEFAULTS[name]


def ttft_model(load_s: float, prefill_s: float, num_layers: int, overlap: bool) -> float:
    """Time to first token from the load and prefill times (see module docstring)."""
    if not overlap or num_layers <= 1:
        return load_s + prefill_s
    L = num_layers
    return (load_s + prefill_s) / L + (L - 1) / L * max(load_s, prefill_s)


def _replay_once(
    rows: dict[str, list],
    capacities: dict[str, int],
    *,
    block_size: int,
    policy: str,
    sequential: bool,
    links: dict[str, Link],
    bytes_per_block: int,
    prefill_tps: float,
    decode_s: float,
    num_layers: int,
    overlap: bool,
) -> tuple[dict[str, Any], dict[str, list]]:
    from sagellm_kv_cache.errors import KVBudgetExceededError
    from sagellm_kv_cache.offload import KVOffloadManager

    mgr = KVOffloadManager.from_capacities(
        capacities, block_size=block_size, eviction_policy=policy, async_copies=False
    )
    names = mgr.tier_names
    per_req: dict[str, list] = {"request_id": [], "ttft_s": [], "recompute_s": []}
    per_req.update({f"hit_blocks_{t}": [] for t in names})
    running: list[tuple[float, int, Any]] = []  # (finish time, seq, handle)
    seq = 0
    for rid, arrival, n_in, n_out, hashes in zip(
        rows["request_id"],
        rows["arrival_s"],
        rows["input_length"],
        rows["output_length"],
        rows["block_hashes"],
    ):
        hashes = list(hashes)[: n_in // block_size]
        start = arrival
        if not sequential:
            while running and running[0][0] <= arrival:
                mgr.free(heapq.heappop(running)[2])
        while True:
            try:
                alloc = mgr.allocate(block_hashes=hashes, num_tokens=n_in, request_id=str(rid))
                break
            except KVBudgetExceededError:
                if sequential or not running:
                    raise
                t_fin, _, h = heapq.heappop(running)
                start = max(start, t_fin)
                mgr.free(h)
        look = alloc.lookup
        load_s = sum(
            links[t].load_s(look.hits_per_tier[t] * bytes_per_block)
            for t in names[1:]
            if t in links
        )
        uncached = n_in - look.num_hit_tokens
        ttft = ttft_model(load_s, uncached / prefill_tps, num_layers, overlap)
        ttft += start - arrival
        per_req["request_id"].append(rid)
        per_req["ttft_s"].append(ttft)
        per_req["recompute_s"].append(n_in / prefill_tps)
        for t in names:
            per_req[f"hit_blocks_{t}"].append(look.hits_per_tier[t])
        mgr.cache_blocks(alloc.handle)
        if sequential:
            mgr.free(alloc.handle)
        else:
            seq += 1
            heapq.heappush(running, (start + ttft + n_out * decode_s, seq, alloc.handle))
    while running:
        mgr.free(heapq.heappop(running)[2])
    stats = mgr.get_stats()
    mgr.check_invariants()
    mgr.close()
    return stats, per_req


def replay_tiered(
    table: Any, tiers: dict[str, int], config: Any = None, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Replay a trace table through a chain of tiers; summary dict (and files in ``out_dir``).

    Args:
        table: polars DataFrame with ``request_id, arrival_s, input_length,
            output_length, block_hashes (list of int64), block_size``.
        tiers: tier name -> capacity in blocks, device first
            (``{"gpu": 2000, "cpu": 8000, "disk": 50000}``).
        config: a ``ReplayConfig``-like object (``block_size``, ``sequential``,
            ``policy``, ``prefill_tokens_per_s``, ``decode_s_per_token``,
            ``model``, ``layerwise_overlap``, ``links``), read with defaults.
        out_dir: where ``summary.json`` and ``ttft.png`` go (``None``: nowhere).

    Returns:
        the summary: per-tier block / token hit ratios, overall ratios, TTFT
        of the tiered run, of the device tier alone and of recomputing
        everything, and the time saved against recomputing.
    """
    from sagellm_kv_cache.errors import KVConfigError
    from sagellm_kv_cache.storage import ModelShape

    if not tiers:
        raise KVConfigError("tiers needs at least the device tier")
    block_size = _cfg(config, "block_size") or (
        int(table["block_size"][0]) if "block_size" in table.columns and len(table) else 512
    )
    model = _cfg(config, "model")
    shape = model if isinstance(model, ModelShape) else ModelShape.named(model)
    links = dict(LINKS)
    links.update(_cfg(config, "links") or {})
    common = dict(
        block_size=block_size,
        policy=_cfg(config, "policy"),
        sequential=bool(_cfg(config, "sequential")),
        links=links,
        bytes_per_block=shape.bytes_per_block(block_size),
        prefill_tps=float(_cfg(config, "prefill_tokens_per_s")),
        decode_s=float(_cfg(config, "decode_s_per_token")),
        num_layers=shape.num_layers,
        overlap=bool(_cfg(config, "layerwise_overlap")),
    )
    cols = ["request_id", "arrival_s", "input_length", "output_length", "block_hashes"]
    rows = {c: table[c].to_list() for c in cols}
    stats, per_req = _replay_once(rows, dict(tiers), **common)
    names = list(tiers)
    dev_only = None
    if len(names) > 1:
        dev_stats, dev_req = _replay_once(rows, {names[0]: tiers[names[0]]}, **common)
        dev_only = {
            "block_hit_ratio": dev_stats["block_hit_ratio"],
            "token_hit_ratio": dev_stats["token_hit_ratio"],
            **_ttft_summary(dev_req["ttft_s"]),
        }
    total_recompute = sum(per_req["recompute_s"])
    total_ttft = sum(per_req["ttft_s"])
    summary = {
        "tiers": dict(tiers),
        "block_size": block_size,
        "num_requests": len(per_req["ttft_s"]),
        "block_hit_ratio": stats["block_hit_ratio"],
        "token_hit_ratio": stats["token_hit_ratio"],
        "request_hit_ratio": stats["request_hit_ratio"],
        "per_tier": {
            t: {
                "capacity_blocks": tiers[t],
                "block_hit_ratio": s["block_hit_ratio"],
                "token_hit_ratio": s["token_hit_ratio"],
                "hit_blocks": s["hit_blocks"],
                "bytes_onboarded": s["hit_blocks"] * common["bytes_per_block"] if i else 0,
                "evicted_blocks": s["evicted_blocks"],
            }
            for i, (t, s) in enumerate(stats["tiers"].items())
        },
        "ttft": _ttft_summary(per_req["ttft_s"]),
        "ttft_device_only": dev_only,
        "ttft_recompute": _ttft_summary(per_req["recompute_s"]),
        "time_saved_s": total_recompute - total_ttft,
        "time_saved_ratio": (total_recompute - total_ttft) / total_recompute
        if total_recompute
        else 0.0,
        "config": {
            k: (
                v
                if not isinstance(v, dict)
                else {n: [lk.bandwidth_bytes_per_s, lk.latency_s] for n, lk in v.items()}
            )
            for k, v in common.items()
        }
        | {"model": str(model)},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        fig = plot_ttft(per_req, dev_req if dev_only else None, names)
        fig.savefig(out / "ttft.png", dpi=120)
        import matplotlib.pyplot as plt

        plt.close(fig)
    return summary


def _ttft_summary(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"mean_s": 0.0, "p50_s": 0.0, "p90_s": 0.0, "p99_s": 0.0, "total_s": 0.0}
    a = np.asarray(values)
    return {
        "mean_s": float(a.mean()),
        "p50_s": float(np.percentile(a, 50)),
        "p90_s": float(np.percentile(a, 90)),
        "p99_s": float(np.percentile(a, 99)),
        "total_s": float(a.sum()),
    }


from sim.analysis.plots import plot_ttft  # noqa: E402  (moved)
