"""``simulate_iteration``: the iteration-level engine (``sim.iteration``) as a ``SimResult``.

Records add to the common columns (``sim.result``): ``first_token_s``,
``itl_mean_s`` and ``itl_max_s`` (inter-token latency per request; its mean equals
``tpot_s``), ``preemptions`` and ``recomputed_tokens``. ``tpot_s`` here is vLLM's
``(e2e - ttft) / (output_length - 1)`` (NaN for one-token outputs). The summary
adds ``itl_max`` percentiles, ``input_tokens_per_s``, ``output_tokens_per_s``,
``num_steps``, ``preemptions``, ``recomputed_tokens`` and, under SLOs
(``parse_slo("ttft=2s,tpot=50ms")``), ``goodput_rps`` (requests meeting every SLO
per second of makespan) and ``slo_attainment`` (their share of the requests).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError

from .cost import parse_cost_model
from .iteration import IterationEngine
from .iteration_ref import ReferenceIterationEngine
from .result import BlockCounts, SimResult, build_result, timing_stats

__all__ = [
    "DEFAULTS",
    "add_serving_metrics",
    "check_settings",
    "instance_blocks",
    "parse_slo",
    "resolve_shape",
    "run_instance",
    "simulate_iteration",
]

#: vLLM v1's defaults vary with the GPU and the entry point; these are the
#: online-serving figures for a large GPU (max_num_seqs 256, budget 8192 tokens).
DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 8192, "chunked_prefill": True}
_SLO_KEYS = ("ttft", "tpot", "itl", "e2e")
_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_slo(text: Any) -> dict[str, float]:
    """``"ttft=2s,tpot=50ms"`` -> ``{"ttft": 2.0, "tpot": 0.05}`` (keys ttft, tpot, itl, e2e)."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        items = [f"{k}={v}" for k, v in text.items()]
    elif isinstance(text, str):
        items = [x for x in text.split(",") if x.strip()]
    else:
        raise KVConfigError(f"slo must be text like ttft=2s,tpot=50ms, got {text!r}")
    out: dict[str, float] = {}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip().lower()
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(s|ms|us)?\s*", val)
        if not sep or key not in _SLO_KEYS or not m:
            raise KVConfigError(
                f"bad SLO item {item!r}; use ttft=2s,tpot=50ms (keys {', '.join(_SLO_KEYS)})"
            )
        out[key] = float(m.group(1)) * _UNITS[m.group(2) or ""]
    return out


def _pos_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
        raise KVConfigError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def simulate_iteration(
    table: Any,
    capacity: Any = None,
    policy: str = "lru",
    *,
    cost: Any = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    chunked_prefill: bool = True,
    slo: Any = None,
    model_shape: Any = None,
    block_size: int | None = None,
    progress: bool = False,
    config: dict | None = None,
    reference: bool = False,
) -> SimResult:
    """Replay a trace table on one iteration-level instance (see ``sim.iteration``).

    ``capacity`` as in ``simulate`` (None: every request's prompt and output blocks
    at once, so nothing is ever evicted or preempted); ``cost`` anything
    ``sim.cost.parse_cost_model`` reads (default: the linear model's defaults).
    ``reference=True`` runs the plain per-step loop (``sim.iteration_ref``), which
    the default engine equals request for request (for checks and benchmarks).

    Raises:
        KVConfigError: bad settings. KVInvalidInputError: the table lacks a column.
    """
    seqs, mbt, slos, cost_m, bs = check_settings(
        table, max_num_seqs, max_num_batched_tokens, chunked_prefill, slo, cost, block_size
    )
    lengths = table["input_length"].to_list()
    outputs = table["output_length"].to_list()
    arrivals = table["arrival_s"].to_list()
    hashes_col = table["block_hashes"].to_list()
    blocks, cap_info = instance_blocks(capacity, table, bs, resolve_shape(model_shape))
    eng = run_instance(
        (hashes_col, lengths, outputs, arrivals),
        blocks,
        bs,
        policy,
        cost_m,
        mbt=mbt,
        seqs=seqs,
        chunked=chunked_prefill,
        progress=progress,
        reference=reference,
    )
    bp = eng.bp
    start = np.asarray(eng.start_s)
    first = np.asarray(eng.first_token_s)
    fin = np.asarray(eng.finish_s)
    times = {"start_s": start, "prefill_s": first - start, "decode_s": fin - first}
    resolved = {
        "mode": "iteration",
        "engine": "iteration",
        "policy": bp.policy.name,
        "capacity": cap_info,
        "capacity_blocks": blocks,
        "block_size": bs,
        "max_num_seqs": seqs,
        "max_num_batched_tokens": mbt,
        "chunked_prefill": chunked_prefill,
        "cost": cost_m.describe(),
        "slo": slos,
        "model_shape": str(model_shape) if model_shape is not None else None,
        **(config or {}),
    }
    res = build_result(
        table,
        mode="iteration",
        policy=bp.policy.name,
        capacity_blocks=blocks,
        block_size=bs,
        blocks=BlockCounts(eng.full, eng.hit, eng.alloc, eng.evicted, eng.rejected),
        evictions=eng.evictions,
        times=times,
        clock="simulated",
        config=resolved,
        timeline=eng.timeline,
        peaks=(eng.peaks[0], eng.peaks[1], eng.peaks[2]),
        more={
            "max_num_seqs": seqs,
            "max_num_batched_tokens": mbt,
            "chunked_prefill": chunked_prefill,
        },
    )
    return add_serving_metrics(res, eng, slos)


def check_settings(
    table: Any,
    max_num_seqs: Any,
    max_num_batched_tokens: Any,
    chunked_prefill: Any,
    slo: Any,
    cost: Any,
    block_size: Any = None,
) -> tuple:
    """Checked ``(max_num_seqs, max_num_batched_tokens, slos, cost model, block_size)``.

    Raises:
        KVConfigError: bad settings. KVInvalidInputError: the table lacks a column.
    """
    from .simulate import _REQUIRED

    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise KVInvalidInputError(f"trace table lacks column(s) {missing}")
    seqs = _pos_int(
        "max_num_seqs", DEFAULTS["max_num_seqs"] if max_num_seqs is None else max_num_seqs
    )
    mbt = _pos_int(
        "max_num_batched_tokens",
        DEFAULTS["max_num_batched_tokens"]
        if max_num_batched_tokens is None
        else max_num_batched_tokens,
    )
    if not isinstance(chunked_prefill, bool):
        raise KVConfigError(f"chunked_prefill must be True or False, got {chunked_prefill!r}")
    slos = parse_slo(slo)
    cost_m = parse_cost_model(cost)
    n = len(table)
    bs = int(table["block_size"][0]) if n and "block_size" in table.columns else 512
    if block_size is not None and n and block_size != bs:
        raise KVConfigError(f"block_size {block_size} differs from the table's {bs}")
    return seqs, mbt, slos, cost_m, bs


def resolve_shape(model_shape: Any) -> Any:
    """A model shape given as text (preset, ``L,H,D,dtype``, config path) resolved."""
    if isinstance(model_shape, str):
        from sagellm_kv_cache.model_shapes import resolve_model_shape

        return resolve_model_shape(model_shape)
    return model_shape


def instance_blocks(capacity: Any, table: Any, block_size: int, shape: Any) -> tuple[int, Any]:
    """(blocks, capacity record) of one instance's pool: ``capacity`` as ``simulate``
    reads it; None: every request's prompt and output blocks at once."""
    from .simulate import resolve_blocks

    blocks, info = resolve_blocks(capacity, table, block_size, shape)
    if blocks is None:
        lengths = table["input_length"].to_list()
        outputs = table["output_length"].to_list()
        bs = block_size
        blocks = max(1, sum(-(-(x + max(1, o)) // bs) for x, o in zip(lengths, outputs)))
    return blocks, info


def run_instance(
    cols: tuple,
    blocks: int,
    block_size: int,
    policy: str,
    cost: Any,
    *,
    mbt: int,
    seqs: int,
    chunked: bool,
    kv_ready: list | None = None,
    progress: bool = False,
    reference: bool = False,
) -> ReferenceIterationEngine:
    """One instance with its own metadata-only pool of ``blocks`` run over ``cols``
    (``(hashes, lengths, outputs, arrivals)`` lists); the engine, its pool as ``.bp``
    (invariants checked)."""
    from .instances import SimClock, metadata_pool

    clock = SimClock()
    pool = metadata_pool(blocks, block_size, policy, clock)
    eng = (ReferenceIterationEngine if reference else IterationEngine)(
        cols,
        pool.block_pool,
        clock,
        cost,
        max_num_batched_tokens=mbt,
        max_num_seqs=seqs,
        chunked_prefill=chunked,
        progress=progress,
        kv_ready=kv_ready,
    ).run()
    eng.bp.check_invariants()
    return eng


def add_serving_metrics(res: SimResult, eng: Any, slos: dict) -> SimResult:
    """Serving columns and figures (module doc) from ``eng``'s per-request lists
    (``outputs``, ``first_token_s``, ``itl_max``, ``preemptions``, ``recomputed``) and
    counts (``num_steps``, ``num_preemptions``)."""
    import polars as pl

    rec = res.records
    out = np.asarray(eng.outputs, dtype=np.float64)
    decode = rec["decode_s"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(out > 1, decode / np.maximum(out - 1, 1), np.nan)
    itl_max = np.asarray(eng.itl_max, dtype=np.float64)
    rec = rec.with_columns(
        pl.Series("tpot_s", tpot),
        pl.Series("first_token_s", np.asarray(eng.first_token_s, dtype=np.float64)),
        pl.Series("itl_mean_s", tpot),
        pl.Series("itl_max_s", itl_max),
        pl.Series("preemptions", np.asarray(eng.preemptions, dtype=np.int64)),
        pl.Series("recomputed_tokens", np.asarray(eng.recomputed, dtype=np.int64)),
    )
    res.records = rec
    st = res.stats
    st.update(timing_stats("tpot_s", tpot))
    st.update(timing_stats("itl_max_s", itl_max))
    ran = ~rec["rejected"].to_numpy() & ~np.isnan(rec["finish_s"].to_numpy())
    span = float(st.get("makespan_s", 0.0))
    inp = rec["input_length"].to_numpy()
    st["input_tokens_per_s"] = float(inp[ran].sum() / span) if span > 0 else 0.0
    st["output_tokens_per_s"] = float(out[ran].sum() / span) if span > 0 else 0.0
    st["num_steps"] = int(eng.num_steps)
    st["preemptions"] = int(eng.num_preemptions)
    st["recomputed_tokens"] = int(sum(eng.recomputed))
    if slos:
        ok = ran.copy()
        cols = {"ttft": "ttft_s", "tpot": "tpot_s", "itl": "itl_max_s", "e2e": "e2e_s"}
        for k, limit in slos.items():
            v = rec[cols[k]].to_numpy()
            ok &= np.isnan(v) | (v <= limit)  # NaN TPOT (one output token) meets any TPOT SLO
        st["slo"] = dict(slos)
        st["goodput_rps"] = float(ok.sum() / span) if span > 0 else 0.0
        st["slo_attainment"] = float(ok.sum() / len(ok)) if len(ok) else 0.0
    return res
