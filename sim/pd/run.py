"""``simulate_pd``: prefill/decode disaggregation over iteration-level instances.

``P`` prefill instances and ``D`` decode instances, each an ``IterationEngine`` with a
pool of its own (``capacity`` blocks each; ``decode_capacity`` for the decode side):

1. A request goes to a prefill instance, round-robin in arrival order (as vLLM's
   disaggregated-serving proxy examples do). There it is scheduled like any request
   whose output is one token: its prompt is computed (chunked at the budget, prefix
   hits in that pool reused) and the first token is sampled. Its prefill blocks are
   freed then (the transfer is not charged to the prefill pool's memory).
2. Its prompt KV (``input_length x`` KV bytes per token of ``model_shape``, or of the
   roofline cost model's model) crosses the link: ``latency + bytes / bandwidth``
   (``sim.pd.link``). The whole prompt moves; hits in the decode pool do not shorten it.
3. It goes to a decode instance, round-robin in the order the KV lands, and waits there
   like any arrival until that pool has room for its prompt plus one token (FCFS,
   head-of-line, up to ``max_num_seqs``); it then decodes: its first step computes the
   first generated token's KV and samples the second token. A preempted request
   recomputes there, as vLLM does. A one-token output never reaches the decode side.

**TTFT** here is when the first token is at the decode instance: prefill queueing +
prefill + transfer. vLLM's disaggregated examples sample the first token on the prefill
instance (``max_tokens=1``) and stream the answer from the decode instance, so the user
sees that token no earlier than the KV has landed; a decode instance that recomputes the
last prompt token to sample the first token would add one decode step (not modelled).
TPOT, ITL and E2E follow from the decode instance's steps (ITL's first gap counts from
the TTFT). Records are the iteration mode's columns (hits, allocations and evictions
from the prefill side) plus ``prefill_instance``, ``decode_instance`` (-1: none),
``transfer_s`` and ``decode_queue_s``; the summary adds ``instances`` (per instance:
role, requests, steps, busy seconds, utilization over the makespan, preemptions, peak
blocks), ``link`` and ``kv_bytes_per_token``.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Any

import numpy as np

from sagellm_kv_cache.errors import KVConfigError

from ..iteration_run import (
    add_serving_metrics,
    check_settings,
    instance_blocks,
    resolve_shape,
    run_instance,
)
from ..result import BlockCounts, SimResult, build_result
from .link import parse_link

__all__ = ["parse_pd", "simulate_pd"]


def parse_pd(spec: Any) -> tuple[int, int]:
    """``"2:6"`` or ``(2, 6)`` -> (prefill instances, decode instances), each >= 1."""
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
        if not m:
            raise KVConfigError(f"pd must be PREFILL:DECODE instance counts like 2:6, got {spec!r}")
        p, d = int(m.group(1)), int(m.group(2))
    elif isinstance(spec, tuple | list) and len(spec) == 2:
        p, d = spec
    else:
        raise KVConfigError(f"pd must be PREFILL:DECODE instance counts like 2:6, got {spec!r}")
    for v in (p, d):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KVConfigError(f"pd instance counts must be integers >= 1, got {spec!r}")
    return p, d


def _kv_bytes_per_token(model_shape: Any, cost: Any, link: Any) -> tuple[int, Any]:
    shape = resolve_shape(model_shape)
    if shape is not None:
        return int(shape.bytes_per_token), shape
    spec = getattr(cost, "model", None)
    if spec is not None and hasattr(spec, "kv_bytes_per_token"):
        return int(spec.kv_bytes_per_token()), None
    if math.isinf(link.bytes_per_s):
        return 0, None
    raise KVConfigError(
        "prefill/decode disaggregation needs the KV bytes per token: give a model shape "
        "(e.g. llama-3-8b) or a roofline cost model"
    )


def _round_robin(keys: list, rows: list, k: int) -> list[list[int]]:
    """``rows`` sorted by ``keys`` (ties by row), dealt to ``k`` instances in turn."""
    order = sorted(rows, key=lambda i: (keys[i], i))
    return [order[j::k] for j in range(k)]


def simulate_pd(
    table: Any,
    pd: Any = (1, 1),
    capacity: Any = None,
    policy: str = "lru",
    *,
    cost: Any = None,
    link: Any = "nvlink",
    decode_capacity: Any = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    chunked_prefill: bool = True,
    slo: Any = None,
    model_shape: Any = None,
    block_size: int | None = None,
    config: dict | None = None,
    reference: bool = False,
) -> SimResult:
    """Replay a trace table on ``pd`` = (prefill, decode) instances (module doc).
    ``reference=True`` runs every instance as the plain per-step loop (for checks).

    Raises:
        KVConfigError: bad settings. KVInvalidInputError: the table lacks a column.
    """
    n_p, n_d = parse_pd(pd)
    seqs, mbt, slos, cost_m, bs = check_settings(
        table, max_num_seqs, max_num_batched_tokens, chunked_prefill, slo, cost, block_size
    )
    lk = parse_link(link)
    bpt, shape = _kv_bytes_per_token(model_shape, cost_m, lk)
    n = len(table)
    lengths = table["input_length"].to_list()
    outputs = [max(1, int(o)) for o in table["output_length"].to_list()]
    arrivals = table["arrival_s"].to_list()
    hashes = table["block_hashes"].to_list()
    p_blocks, p_info = instance_blocks(capacity, table, bs, shape)
    d_cap = capacity if decode_capacity is None else decode_capacity
    d_blocks, d_info = instance_blocks(d_cap, table, bs, shape)
    kw = dict(mbt=mbt, seqs=seqs, chunked=chunked_prefill, reference=reference)
    nan = math.nan
    c = SimpleNamespace(
        outputs=outputs,
        start=[nan] * n,
        first_token_s=[nan] * n,
        finish=[nan] * n,
        itl_max=[nan] * n,
        preemptions=[0] * n,
        recomputed=[0] * n,
        hit=[0] * n,
        alloc=[0] * n,
        evicted=[0] * n,
        rejected=[False] * n,
        p_inst=[-1] * n,
        d_inst=[-1] * n,
        transfer=[nan] * n,
        d_queue=[nan] * n,
        num_steps=0,
        num_preemptions=0,
    )
    ready = [nan] * n
    insts: list[dict] = []
    evictions = 0

    def account(role: str, k: int, eng: Any, rows: list) -> None:
        nonlocal evictions
        c.num_steps += eng.num_steps
        c.num_preemptions += eng.num_preemptions
        evictions += eng.evictions
        insts.append(
            {
                "role": role,
                "index": k,
                "requests": len(rows),
                "steps": eng.num_steps,
                "busy_s": eng.busy_s,
                "preemptions": eng.num_preemptions,
                "peak_blocks_in_use": eng.peaks[0],
                "capacity_blocks": eng.bp.num_blocks,
            }
        )

    for k, rows in enumerate(_round_robin(arrivals, list(range(n)), n_p)):
        cols = (
            [hashes[i] for i in rows],
            [lengths[i] for i in rows],
            [1] * len(rows),
            [arrivals[i] for i in rows],
        )
        eng = run_instance(cols, p_blocks, bs, policy, cost_m, **kw)
        for j, i in enumerate(rows):
            c.p_inst[i] = k
            c.hit[i], c.alloc[i], c.evicted[i] = eng.hit[j], eng.alloc[j], eng.evicted[j]
            c.preemptions[i] += eng.preemptions[j]
            c.recomputed[i] += eng.recomputed[j]
            if eng.rejected[j]:
                c.rejected[i] = True
                continue
            c.start[i] = eng.start_s[j]
            c.first_token_s[i] = c.finish[i] = eng.finish_s[j]
            if outputs[i] > 1:
                c.transfer[i] = lk.transfer_s(lengths[i] * bpt)
                ready[i] = eng.finish_s[j] + c.transfer[i]
        account("prefill", k, eng, rows)
    to_decode = [i for i in range(n) if not math.isnan(ready[i])]
    for k, rows in enumerate(_round_robin(ready, to_decode, n_d)):
        cols = (
            [hashes[i] for i in rows],
            [lengths[i] for i in rows],
            [outputs[i] for i in rows],
            [ready[i] for i in rows],
        )
        eng = run_instance(
            cols, d_blocks, bs, policy, cost_m, kv_ready=[lengths[i] for i in rows], **kw
        )
        for j, i in enumerate(rows):
            c.d_inst[i] = k
            c.preemptions[i] += eng.preemptions[j]
            c.recomputed[i] += eng.recomputed[j]
            if eng.rejected[j]:
                c.rejected[i] = True
                c.start[i] = c.first_token_s[i] = c.finish[i] = nan
                continue
            c.first_token_s[i] = ready[i]
            c.finish[i] = eng.finish_s[j]
            c.itl_max[i] = eng.itl_max[j]
            c.d_queue[i] = eng.start_s[j] - ready[i]
        account("decode", k, eng, rows)
    start, first, fin = (
        np.asarray(x, dtype=np.float64) for x in (c.start, c.first_token_s, c.finish)
    )
    times = {"start_s": start, "prefill_s": first - start, "decode_s": fin - first}
    resolved = {
        "mode": "pd",
        "engine": "iteration",
        "pd": [n_p, n_d],
        "policy": policy,
        "capacity": p_info,
        "capacity_blocks": p_blocks,
        "decode_capacity": d_info,
        "decode_capacity_blocks": d_blocks,
        "block_size": bs,
        "max_num_seqs": seqs,
        "max_num_batched_tokens": mbt,
        "chunked_prefill": chunked_prefill,
        "cost": cost_m.describe(),
        "link": lk.describe(),
        "kv_bytes_per_token": bpt,
        "slo": slos,
        "model_shape": str(model_shape) if model_shape is not None else None,
        **(config or {}),
    }
    res = build_result(
        table,
        mode="pd",
        policy=policy,
        capacity_blocks=p_blocks,
        block_size=bs,
        blocks=BlockCounts([x // bs for x in lengths], c.hit, c.alloc, c.evicted, c.rejected),
        evictions=evictions,
        times=times,
        clock="simulated",
        config=resolved,
        more={"pd": [n_p, n_d], "link": lk.describe(), "kv_bytes_per_token": bpt},
    )
    res = add_serving_metrics(res, c, slos)
    import polars as pl

    res.records = res.records.with_columns(
        pl.Series("prefill_instance", c.p_inst, dtype=pl.Int64),
        pl.Series("decode_instance", c.d_inst, dtype=pl.Int64),
        pl.Series("transfer_s", c.transfer, dtype=pl.Float64),
        pl.Series("decode_queue_s", c.d_queue, dtype=pl.Float64),
    )
    span = float(res.stats.get("makespan_s", 0.0))
    for row in insts:
        row["utilization"] = row["busy_s"] / span if span > 0 else 0.0
    res.stats["instances"] = insts
    return res
