"""``SimResult``: the one result type of every replay mode, OPT and the curves.

``records`` (polars, one row per trace row, in trace order):

==================  ============================================================
request_id          the trace's id
arrival_s           arrival time (trace seconds)
input_length        prompt tokens; ``output_length`` output tokens (when known)
full_blocks         the prompt's full blocks (the ones a cache can hold)
hit_blocks          leading blocks found cached (all tiers); ``hit_tokens`` x block size
hit_blocks_<tier>   hits per tier (``hit_blocks_gpu``; tiered runs add cpu/disk/...)
allocated_blocks    blocks newly allocated on the device
evicted_blocks      blocks its allocation evicted (device tier)
rejected            more full blocks than the device holds: never ran, a miss
start_s             when it was admitted; ``queue_s`` = start_s - arrival_s
prefill_s           prefill duration (loading lower tiers and computing uncached tokens);
                    ``prefill_end_s`` = start_s + prefill_s (its blocks become hittable)
decode_s            decode duration; ``tpot_s`` = decode_s / output_length
ttft_s              queue_s + prefill_s; ``e2e_s`` = ttft_s + decode_s; ``finish_s``
==================  ============================================================

Timing columns exist where the mode has a clock (``summary()["clock"]``):
``"simulated"`` (concurrent: queueing included), ``"isolated"`` (sequential and
tiered-sequential: each request's cost alone, ``queue_s`` = 0) or ``None`` (OPT).
They are NaN for rejected requests; statistics cover the requests that ran.

``summary()`` holds plain JSON types with stable names, ``token_hit_ratio``
first (the figure to quote: hit tokens / prompt tokens); ``request_hit_ratio``
counts requests with at least one hit block, which is near 1 whenever every
request shares a system prompt. ``config`` is the resolved configuration
(format detected, model, capacity as given with its unit and in blocks).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .ratios import hit_ratios

__all__ = [
    "TIMING_METRICS",
    "SimResult",
    "build_result",
    "clocked_times",
    "isolated_times",
    "timing_stats",
]

#: per-request times summarised as mean/p50/p90/p99/max in ``summary()``
TIMING_METRICS = ("queue_s", "ttft_s", "tpot_s", "e2e_s")


@dataclass
class SimResult:
    """Per-request ``records``, the resolved ``config`` and ``summary()`` (see module doc).

    Summary fields read as attributes (``r.token_hit_ratio``) and items (``r["ttft"]``).
    """

    records: Any  # polars.DataFrame
    config: dict
    stats: dict
    timeline: Any = None  # polars.DataFrame (time_s, waiting, running, blocks_in_use) or None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Plain JSON types, stable names, ``token_hit_ratio`` first."""
        return {**self.stats, **self.extra}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        stats = self.__dict__.get("stats", {})
        if name in stats:
            return stats[name]
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"SimResult has no field {name!r}")

    def __getitem__(self, key: str) -> Any:
        return self.summary()[key]

    def write(self, out_dir: str | Path) -> list[str]:
        """``config.json``, ``records.parquet``, ``summary.json`` (and ``timeline.parquet``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_plain(self.config), indent=2))
        self.records.write_parquet(out / "records.parquet")
        (out / "summary.json").write_text(json.dumps(_plain(self.summary()), indent=2))
        files = ["config.json", "records.parquet", "summary.json"]
        if self.timeline is not None:
            self.timeline.write_parquet(out / "timeline.parquet")
            files.append("timeline.parquet")
        return files


def _plain(x: Any) -> Any:
    """numpy scalars and tuples to JSON types; NaN to None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating | float):
        v = float(x)
        return None if math.isnan(v) else v
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def timing_stats(name: str, values: np.ndarray) -> dict[str, float]:
    """``{name_mean_s, name_p50_s, name_p90_s, name_p99_s, name_max_s}`` (zeros when empty)."""
    base = name[:-2] if name.endswith("_s") else name
    values = values[~np.isnan(values)]
    if not len(values):
        return {f"{base}_{k}_s": 0.0 for k in ("mean", "p50", "p90", "p99", "max")}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        f"{base}_mean_s": float(values.mean()),
        f"{base}_p50_s": float(p50),
        f"{base}_p90_s": float(p90),
        f"{base}_p99_s": float(p99),
        f"{base}_max_s": float(values.max()),
    }


def clocked_times(eng: Any) -> dict[str, np.ndarray]:
    """Start, prefill and decode seconds per request from an engine run on the
    simulated clock (``start_s``, ``prefill_end_s``, ``finish_s`` columns)."""
    start = np.asarray(eng.start_s)
    pend = np.asarray(eng.prefill_end_s)
    return {
        "start_s": start,
        "prefill_s": pend - start,
        "decode_s": np.asarray(eng.finish_s) - pend,
    }


def isolated_times(table: Any, inst: Any, hit: np.ndarray, cost: Any, ran: np.ndarray) -> dict:
    """Start, prefill and decode seconds per request, each request's cost alone (the
    sequential mode): prefill from the uncached tokens by ``cost`` (then the
    instance's own rule, ``inst.prefill_times``: loading lower tiers' hits first),
    decode from the output tokens; NaN where a request never ran."""
    lengths = table["input_length"].to_numpy().astype(np.float64)
    uncached = lengths - hit * inst.block_size
    compute = cost.prefill_overhead_s + cost.prefill_s_per_token * uncached
    prefill = inst.prefill_times(compute)
    outputs = table["output_length"].to_numpy().astype(np.float64)
    decode = cost.decode_overhead_s + cost.decode_s_per_token * outputs
    start = table["arrival_s"].cast(float).to_numpy().copy() if len(table) else np.zeros(0)
    return {
        "start_s": np.where(ran, start, np.nan),
        "prefill_s": np.where(ran, prefill, np.nan),
        "decode_s": np.where(ran, decode, np.nan),
    }


class BlockCounts(NamedTuple):
    """An engine's per-request block counts (lists or arrays, one entry a request)."""

    full: Any  #: the prompt's full blocks
    hit: Any  #: its leading run of cached blocks
    allocated: Any  #: blocks newly allocated on the device
    evicted: Any  #: blocks its allocation evicted
    rejected: Any  #: more full blocks than the device holds (bool)


def build_result(
    table: Any,
    *,
    mode: str,
    policy: str,
    capacity_blocks: int,
    block_size: int,
    blocks: BlockCounts,
    evictions: int,
    hits_per_tier: dict[str, Any] | None = None,
    times: dict[str, Any] | None = None,
    clock: str | None = None,
    config: dict | None = None,
    timeline: Any = None,
    peaks: tuple[int, int, int] | None = None,
    more: dict | None = None,
) -> SimResult:
    """Assemble records and summary from an engine's columns (lists or arrays):
    ``blocks`` its per-request block counts.

    ``times`` (when the mode has a clock): ``start_s, prefill_s, decode_s`` arrays
    (NaN where a request did not run); the rest is derived here.
    """
    import polars as pl

    full, hit, allocated, evicted, rejected = blocks
    cols = table.columns
    n = len(table)
    hit_a = np.asarray(hit, dtype=np.int64)
    full_a = np.asarray(full, dtype=np.int64)
    rej = np.asarray(rejected, dtype=bool)
    lengths = table["input_length"].cast(pl.Int64).to_numpy() if n else np.zeros(0, np.int64)
    data: dict[str, Any] = {
        "request_id": table["request_id"] if "request_id" in cols else np.arange(n).astype(str),
        "arrival_s": table["arrival_s"].cast(pl.Float64).to_numpy()
        if "arrival_s" in cols
        else np.zeros(n),
        "input_length": lengths,
    }
    outputs = None
    if "output_length" in cols:
        outputs = table["output_length"].cast(pl.Int64).to_numpy()
        data["output_length"] = outputs
    data["full_blocks"] = full_a
    data["hit_blocks"] = hit_a
    data["hit_tokens"] = hit_a * block_size
    for t, v in (hits_per_tier or {"gpu": hit_a}).items():
        data[f"hit_blocks_{t}"] = np.asarray(v, dtype=np.int64)
    data["allocated_blocks"] = np.asarray(allocated, dtype=np.int64)
    data["evicted_blocks"] = np.asarray(evicted, dtype=np.int64)
    data["rejected"] = rej
    timing: dict[str, float] = {}
    if times is not None:
        arrival = data["arrival_s"]
        start = np.asarray(times["start_s"], dtype=np.float64)
        prefill = np.asarray(times["prefill_s"], dtype=np.float64)
        decode = np.asarray(times["decode_s"], dtype=np.float64)
        queue = start - arrival
        ttft = queue + prefill
        e2e = ttft + decode
        out_tok = outputs if outputs is not None else np.zeros(n, np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(out_tok > 0, decode / np.maximum(out_tok, 1), np.nan)
        finish = arrival + e2e
        data.update(
            start_s=start,
            queue_s=queue,
            prefill_s=prefill,
            prefill_end_s=start + prefill,
            decode_s=decode,
            ttft_s=ttft,
            tpot_s=tpot,
            e2e_s=e2e,
            finish_s=finish,
        )
        for name in TIMING_METRICS:
            timing.update(timing_stats(name, data[name]))
        ran = ~rej & ~np.isnan(finish)
        if clock == "simulated":
            span = float(finish[ran].max() - arrival.min()) if ran.any() else 0.0
            timing["makespan_s"] = span
            timing["throughput_rps"] = float(ran.sum() / span) if span > 0 else 0.0
            timing["output_tokens_per_s"] = float(out_tok[ran].sum() / span) if span > 0 else 0.0
    records = pl.DataFrame(data)
    hit_blocks = int(hit_a.sum())
    full_blocks = int(full_a.sum())
    prompt_tokens = int(lengths.sum()) if n else 0
    stats: dict[str, Any] = {
        **hit_ratios(
            hit_blocks,
            int(np.count_nonzero(hit_a)),
            block_size=block_size,
            prompt_tokens=prompt_tokens,
            full_blocks=full_blocks,
            num_requests=n,
        ),
        "mode": mode,
        "policy": policy,
        "capacity_blocks": int(capacity_blocks),
        "block_size": int(block_size),
        "num_requests": n,
        "num_rejected": int(rej.sum()),
        "hit_blocks": hit_blocks,
        "hit_tokens": hit_blocks * block_size,
        "full_blocks": full_blocks,
        "prompt_tokens": prompt_tokens,
        "evictions": int(evictions),
    }
    for t in hits_per_tier or {}:
        stats[f"hit_blocks_{t}"] = int(data[f"hit_blocks_{t}"].sum())
    stats["clock"] = clock
    stats.update(timing)
    if peaks is not None:
        stats["peak_blocks_in_use"], stats["peak_running"], stats["peak_waiting"] = map(int, peaks)
    if more:
        stats.update(more)
    tl = None
    if timeline is not None:
        tl = pl.DataFrame(
            {
                k: np.frombuffer(v, dtype=np.float64 if v.typecode == "d" else np.int64)
                for k, v in timeline.items()
            },
            schema={
                "time_s": pl.Float64,
                "waiting": pl.Int64,
                "running": pl.Int64,
                "blocks_in_use": pl.Int64,
            },
        )
    return SimResult(records=records, config=dict(config or {}), stats=_plain(stats), timeline=tl)
