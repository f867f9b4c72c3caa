"""The replay workbench: trace replay through the library's own pool, bounds and sweeps.

Every replay mode is a configuration of one event engine (``core``) and returns
one ``SimResult`` (``result``: ``records``, ``summary()``, ``config``):

* ``simulate.simulate`` — the engine's entry point (``from sim.simulate import simulate``);
* ``replay.replay_sequential`` — each request released before the next (published setting);
* ``engine.replay_concurrent`` — requests on a simulated clock with queueing and a cost model;
* ``tiered.replay_tiered`` — GPU/CPU/disk tiers with a modelled TTFT;
* ``mrc.lru_mrc`` — the LRU hit ratio at every capacity from one pass (stack distances);
* ``opt.replay_opt`` — the prefix-aware offline optimum (Belady) at a capacity;
* ``sweep.sweep`` — traces x policies x capacities on local processes or Ray
  (``from sim.sweep import sweep``: the module and the function share the name).

Submodules are imported on first use (polars and friends stay unloaded until needed).
"""

from __future__ import annotations

from sagellm_kv_cache.lazy import lazy_exports

_LAZY = {
    "SimResult": "result",
    "Engine": "core",
    "ReplayResult": "replay",
    "replay_sequential": "replay",
    "hit_ratio_curve": "replay",
    "replay_concurrent": "engine",
    "replay_tiered": "tiered",
    "MRCResult": "mrc",
    "lru_mrc": "mrc",
    "replay_opt": "opt",
    "ReplayConfig": "config",
    "LinearCostModel": "config",
    "parse_capacity": "config",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
