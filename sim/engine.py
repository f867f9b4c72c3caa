"""Concurrent trace replay: requests overlap on a simulated clock, through the real block pool.

The event engine (``sim.core``) in its clocked configuration: arrivals merged from
the arrival-sorted trace, a ``heapq`` of timed events, one instance whose cache is
a metadata-only ``KVPool`` on the simulated clock (time-based policies see
simulated seconds).
One request's life::

    arrival ──> waiting (FIFO) ──admit──> prefill ──────────> decode ──────────> finish
       t_a         queue_s        t_s      cost.prefill_s(     cost.decode_s(      t_f
                                           uncached tokens)    output_length)
                                       │                    │                   │
                          match_prefix + touch         cache its full     release its blocks
                          the leading cached run,      blocks (visible    tail-first (ref 0:
                          allocate the rest (the       to lookups from    evictable if cached)
                          policy evicts)               now on)

Semantics (the same block semantics as ``sim.replay.replay_sequential``):

* a request's blocks are its *full* blocks (``input_length // block_size`` leading
  hash ids); the partial tail block is always recomputed and takes no capacity;
* admission is strictly FIFO in arrival order (ties: trace row order). The head of
  the queue is admitted when ``max_num_seqs`` allows and the pool can supply its
  blocks *now*: ``full - hits <= free + evictable - evictable hits`` (hit blocks it
  takes leave the evictable set). Otherwise it waits, and every request behind it
  waits too, until a finish releases blocks (or a prefill end caches blocks it can
  hit). ``queue_s = start_s - arrival_s``;
* a request with more full blocks than the whole capacity can never run: it is
  rejected at arrival, counted in ``num_rejected`` and as a miss (its full blocks
  count in ``full_blocks``, as in sequential mode); it never blocks the queue;
* blocks are cached when prefill *ends*: a request admitted while another is still
  prefilling the same prefix does not hit those blocks (the KV is not written yet)
  and computes them itself; its copies are not registered (one block per hash) and
  return to the free queue when it finishes;
* ``ttft_s = prefill_end_s - arrival_s`` (queueing plus prefill; the cost model's
  prefill includes producing the first token); ``finish_s = prefill_end_s +
  cost.decode_s(output_length)``;
* a policy that cannot name enough victims now (``KVNoVictimError``, a structural
  constraint) makes the head wait like a short pool: its hits are released again
  (which re-queues them in the policy as freshly released) and it retries at the next
  event; with nothing running the error propagates (waiting would never end);
* events at the same simulated time run in this order: finishes, then prefill ends,
  then arrivals (each kind in the order it was scheduled). So with a cost model of
  zero times every request finishes before the next one arrives, even at equal
  timestamps, and the replay equals the sequential one block for block.

Hit ratios use ``replay_sequential``'s definitions: ``token_hit_ratio`` = hit
blocks x block_size / sum of ``input_length``; ``block_hit_ratio`` = hit blocks /
full blocks; ``request_hit_ratio`` = requests with at least one hit block / requests.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sagellm_kv_cache.errors import KVConfigError

from .config import ReplayConfig
from .result import SimResult
from .simulate import simulate

__all__ = ["ConcurrentResult", "plot_queue_ttft", "replay_concurrent"]

#: the former name of the concurrent result (now the one ``SimResult``)
ConcurrentResult = SimResult


def _resolve_config(config: ReplayConfig | dict | None, overrides: dict) -> ReplayConfig:
    if config is None:
        config = ReplayConfig(progress=False)
    elif isinstance(config, dict):
        config = ReplayConfig(**{"progress": False, **config})
    elif not isinstance(config, ReplayConfig):
        raise KVConfigError(f"config must be a ReplayConfig, dict or None, got {config!r}")
    if "cost_model" in overrides:  # the name the CLI uses
        overrides["cost"] = overrides.pop("cost_model")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ReplayConfig)}
    if unknown:
        raise KVConfigError(f"unknown replay setting(s) {sorted(unknown)}")
    return dataclasses.replace(config, **{**overrides, "mode": "concurrent"})


def replay_concurrent(
    table,
    capacity: Any = None,
    policy: str | None = None,
    /,
    *,
    config: ReplayConfig | dict | None = None,
    **overrides: Any,
) -> SimResult:
    """Replay a canonical trace table with overlapping requests on a simulated clock.

    Args:
        table: polars DataFrame with ``request_id, arrival_s, input_length,
            output_length, block_hashes`` (list of ints) and ``block_size``
            (see ``traces``).
        capacity: cache size in any unit ``sim.config`` reads (2000, ``"5.12Mt"``,
            ``"40GiB"`` with ``model_shape``, ``"10%"``, ``"inf"``), or a
            ``ReplayConfig`` / dict of its fields (the older call form).
        policy: eviction policy name (default the config's, ``"lru"``).
        config: a ``ReplayConfig`` (or dict); ``capacity``, ``policy``, ``cost``,
            ``max_num_seqs``, ``model_shape``, ``block_size`` and ``progress`` are used.
        **overrides: ``ReplayConfig`` fields replacing the config's
            (``cost=LinearCostModel.zero()``, ``max_num_seqs=4``, ``progress=True``...;
            ``cost_model=`` is accepted for ``cost=``).

    Returns:
        a ``SimResult`` (mode ``"concurrent"``, clock ``"simulated"``) with a ``timeline``.

    Raises:
        KVConfigError: bad settings (unknown policy, capacity below one block,
            bytes without a model shape, a ``block_size`` other than the table's).
        KVInvalidInputError: the table lacks a required column.
    """
    if isinstance(capacity, ReplayConfig | dict):
        config, capacity = capacity, None
    if capacity is not None:
        overrides["capacity"] = capacity
    if policy is not None:
        overrides["policy"] = policy
    cfg = _resolve_config(config, dict(overrides))
    return simulate(
        table,
        cfg.capacity,
        cfg.policy,
        mode="concurrent",
        cost=cfg.cost,
        max_num_seqs=cfg.max_num_seqs,
        model_shape=cfg.model_shape,
        block_size=cfg.block_size,
        progress=cfg.progress,
    )


from sim.analysis.plots import plot_queue_ttft  # noqa: E402  (moved)
