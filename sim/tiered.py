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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .ratios import block_hit_ratio, token_hit_ratio

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


def ttft_model(load_s: Any, prefill_s: Any, num_layers: int, overlap: bool) -> Any:
    """Time to first token from the load and prefill times (see module docstring).

    Scalars give a float; numpy arrays (one entry per request) give an array.
    """
    if not overlap or num_layers <= 1:
        return load_s + prefill_s
    L = num_layers
    if isinstance(load_s, np.ndarray) or isinstance(prefill_s, np.ndarray):
        peak = np.maximum(load_s, prefill_s)
    else:
        peak = max(load_s, prefill_s)
    return (load_s + prefill_s) / L + (L - 1) / L * peak


def replay_tiered(
    table: Any, tiers: dict[str, Any], config: Any = None, out_dir: str | Path | None = None
) -> Any:
    """Replay a trace table through a chain of tiers on the event engine (``sim.core``).

    Args:
        table: polars DataFrame with ``request_id, arrival_s, input_length,
            output_length, block_hashes (list of int64), block_size``.
        tiers: tier name -> capacity (blocks, or any unit ``sim.config`` reads), device
            first (``{"gpu": 2000, "cpu": 8000, "disk": 50000}``).
        config: a ``ReplayConfig``-like object (``block_size``, ``sequential``,
            ``policy``, ``prefill_tokens_per_s``, ``decode_s_per_token``,
            ``model``, ``layerwise_overlap``, ``links``, ``max_num_seqs``), read with defaults.
        out_dir: where the run's files go (``None``: nowhere).

    Returns:
        a ``SimResult`` (mode ``"sequential+tiers"`` or ``"concurrent+tiers"``) whose
        summary adds per-tier figures, the TTFT of the tiered run (``ttft``), of the
        device tier alone (``ttft_device_only``) and of recomputing everything
        (``ttft_recompute``), and the time saved against recomputing. A request
        with more full blocks than the device tier is rejected (a miss), as in
        every replay.
    """
    import numpy as np

    from sagellm_kv_cache.errors import KVConfigError
    from sagellm_kv_cache.storage import ModelShape

    from .config import LinearCostModel
    from .simulate import simulate

    if not tiers:
        raise KVConfigError("tiers needs at least the device tier")
    model = _cfg(config, "model")
    shape = model if isinstance(model, ModelShape) else ModelShape.named(model)
    links = dict(LINKS)
    links.update(_cfg(config, "links") or {})
    prefill_tps = float(_cfg(config, "prefill_tokens_per_s"))
    decode_s = float(_cfg(config, "decode_s_per_token"))
    sequential = bool(_cfg(config, "sequential"))
    cost = LinearCostModel(1.0 / prefill_tps if prefill_tps else 0.0, 0.0, decode_s, 0.0)
    max_seqs = getattr(config, "max_num_seqs", None) if config is not None else None
    common = dict(
        mode="sequential" if sequential else "concurrent",
        cost=cost,
        max_num_seqs=None if sequential else max_seqs,
        model_shape=shape,
        links=links,
        layerwise_overlap=bool(_cfg(config, "layerwise_overlap")),
        block_size=_cfg(config, "block_size"),
    )
    policy = _cfg(config, "policy")
    res = simulate(table, None, policy, tiers=dict(tiers), **common)
    names = list(tiers)
    bs = res.block_size
    bpb = shape.bytes_per_block(bs)
    rec = res.records
    ran = ~rec["rejected"].to_numpy()
    ttft = rec["ttft_s"].to_numpy()[ran]
    recompute = rec["input_length"].to_numpy()[ran] / prefill_tps if prefill_tps else ttft * 0
    dev_only = None
    if len(names) > 1:
        dev = simulate(table, None, policy, tiers={names[0]: tiers[names[0]]}, **common)
        dev_only = {
            "block_hit_ratio": dev.block_hit_ratio,
            "token_hit_ratio": dev.token_hit_ratio,
            **_ttft_summary(dev.records["ttft_s"].drop_nans().to_list()),
        }
    qb = res.full_blocks
    prompt = res.prompt_tokens
    per_tier = {}
    for i, t in enumerate(names):
        hb = int(rec[f"hit_blocks_{t}"].sum())
        per_tier[t] = {
            "capacity_blocks": res.tiers[t],
            "block_hit_ratio": block_hit_ratio(hb, qb),
            "token_hit_ratio": token_hit_ratio(hb, bs, prompt),
            "hit_blocks": hb,
            "bytes_onboarded": hb * bpb if i else 0,
            "evicted_blocks": res.tier_stats.get(t, {}).get("evicted_blocks", 0),
        }
    total_recompute = float(np.sum(recompute))
    total_ttft = float(np.sum(ttft))
    res.extra.update(
        {
            "per_tier": per_tier,
            "ttft": _ttft_summary(list(ttft)),
            "ttft_device_only": dev_only,
            "ttft_recompute": _ttft_summary(list(recompute)),
            "time_saved_s": total_recompute - total_ttft,
            "time_saved_ratio": (total_recompute - total_ttft) / total_recompute
            if total_recompute
            else 0.0,
            "config": {
                "block_size": bs,
                "policy": res.policy,
                "sequential": sequential,
                "links": {n: [lk.bandwidth_bytes_per_s, lk.latency_s] for n, lk in links.items()},
                "bytes_per_block": bpb,
                "prefill_tps": prefill_tps,
                "decode_s": decode_s,
                "num_layers": shape.num_layers,
                "overlap": common["layerwise_overlap"],
                "model": str(model),
            },
        }
    )
    res.config["model_shape"] = str(model)
    if out_dir is not None:
        out = Path(out_dir)
        res.write(out)
        from .analysis.plots import plot_ttft, save_figure

        dev_req = None
        if dev_only is not None:
            dev_req = {"ttft_s": dev.records["ttft_s"].drop_nans().to_list()}
        fig = plot_ttft({"ttft_s": list(ttft), "recompute_s": list(recompute)}, dev_req, names)
        save_figure(fig, out / "ttft.png")
    return res


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


from sim.analysis.plots import plot_ttft  # noqa: E402, F401  (moved; re-exported)
