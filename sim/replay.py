"""Sequential trace replay: the event engine (``sim.core``) at zero time, one request at a time.

Each request, in trace order, is looked up, allocated, cached and released
before the next (the setting published hit ratios use). Semantics:

* a request's blocks are its *full* blocks: the first ``input_length // block_size``
  hash ids; the partial tail block is not cached and takes no capacity here;
* one block per hash; a request hits its leading run of cached blocks, which
  stay in use until it is released; blocks are released tail-first;
* a request with more full blocks than the capacity is *rejected*: a miss,
  nothing cached (``records["rejected"]``);
* ``token_hit_ratio`` = hit blocks x block_size / sum of ``input_length``,
  ``block_hit_ratio`` = hit blocks / full blocks, ``request_hit_ratio`` =
  requests with at least one hit block / requests.
"""

from __future__ import annotations

from typing import Any

from .result import SimResult
from .simulate import simulate

__all__ = ["ReplayResult", "hit_ratio_curve", "replay_sequential"]

#: the former name of the sequential result (now the one ``SimResult``)
ReplayResult = SimResult


def replay_sequential(
    table, capacity: Any = None, policy: str = "lru", *, progress: bool = False, **kw: Any
) -> SimResult:
    """Replay a canonical trace table sequentially at ``capacity`` (None: infinite).

    Args:
        table: a canonical trace table (``traces``).
        capacity: blocks (int) or any capacity text ``sim.config`` reads
            (``"5.12Mt"``, ``"40GiB"`` with ``model_shape=``, ``"10%"``, ``"inf"``).
        policy: eviction policy name.
        progress: show a progress bar.
        **kw: more ``sim.simulate.simulate`` settings (``model_shape``, ``cost``, ``hooks``).

    Returns:
        a ``SimResult`` (mode ``"sequential"``). Infinite capacity uses a pool
        as large as the trace's distinct blocks, which never evicts.
    """
    return simulate(table, capacity, policy, mode="sequential", progress=progress, **kw)


def hit_ratio_curve(table, capacities, policies=("lru",), *, progress: bool = False) -> list[dict]:
    """Direct sequential replays at each capacity x policy, plus the infinite bound."""
    from tqdm import tqdm

    rows = []
    jobs = [(p, c) for p in policies for c in capacities] + [("infinite", None)]
    for policy, cap in tqdm(jobs, desc="hit-ratio curve", unit="replay", disable=not progress):
        r = replay_sequential(table, cap, "lru" if policy == "infinite" else policy)
        rows.append(
            {
                "policy": policy,
                "capacity_blocks": r.capacity_blocks,
                "token_hit_ratio": r.token_hit_ratio,
                "block_hit_ratio": r.block_hit_ratio,
                "request_hit_ratio": r.request_hit_ratio,
            }
        )
    return rows
