"""The instances the event engine (``sim.core``) drives: one serving instance's cache.

``PoolInstance`` is a metadata-only ``KVPool`` (the library's pool, its policy
on the simulated clock); ``TieredInstance`` a ``KVOffloadManager``, device tier
first; ``sim.global_pool.GlobalPoolInstance`` a ``PoolInstance`` whose misses
look in a pool shared by a fleet. Each keeps per-request columns (hit,
allocated and evicted blocks, the blocks or handle it holds) indexed by trace row.
"""

from __future__ import annotations

from typing import Any

from sagellm_kv_cache.errors import KVBudgetExceededError, KVNoVictimError

__all__ = ["Instance", "PoolInstance", "SimClock", "TieredInstance", "metadata_pool"]


class SimClock:
    """The simulated clock the library's pool (and its policy) reads."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def metadata_pool(capacity_blocks: int, block_size: int, policy: Any, clock: Any) -> Any:
    """A metadata-only ``KVPool`` on the simulated clock (no KV tensors)."""
    from sagellm_kv_cache.pool import KVPool

    return KVPool(
        num_blocks=capacity_blocks,
        block_size=block_size,
        eviction_policy=policy,
        metadata_only=True,
        clock=clock,
    )


class Instance:
    """What the engine asks of an instance; per-request columns indexed by trace row.

    ``start(i, hashes, full, anything_running)`` (False: it must wait),
    ``prefill_s(i, uncached_tokens)``, ``written(i, hashes)``, ``finish(i)``,
    ``close()``; ``bp`` is the device tier's ``BlockPool``.
    """

    tier_names: tuple[str, ...] = ("gpu",)
    #: the per-request columns
    COLUMNS: tuple[str, ...] = ("hit", "alloc", "evicted", "held")
    bp: Any

    def __init__(self, capacity_blocks: int, block_size: int, cost: Any, n: int) -> None:
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.cost = cost
        self.hit = [0] * n
        self.alloc = [0] * n
        self.evicted = [0] * n
        self.held: list[Any] = [None] * n

    def share_columns(self, other: Instance) -> None:
        """Write the per-request columns into ``other``'s lists (a fleet: each request
        lives on one instance, so one set of columns serves them all)."""
        for name in self.COLUMNS:
            setattr(self, name, getattr(other, name))

    @property
    def num_used(self) -> int:
        return self.bp.num_used

    @property
    def num_evictions(self) -> int:
        return self.bp.num_evictions

    def prefill_s(self, i: int, uncached_tokens: int) -> float:
        return self.cost.prefill_s(uncached_tokens)

    def prefill_times(self, compute_s: Any) -> Any:
        """``prefill_s`` of every request at once, from each one's compute time (an array)."""
        return compute_s

    def close(self) -> dict:
        return {}

    def start(self, i: int, hashes: list, full: int, anything_running: bool) -> bool:
        raise NotImplementedError

    def written(self, i: int, hashes: list) -> None:
        raise NotImplementedError

    def finish(self, i: int) -> None:
        raise NotImplementedError

    def serve(self, i: int, hashes: list, full: int) -> None:
        """Request ``i`` start to finish at one instant with nothing running (the
        sequential loop): ``start``, ``written`` and ``finish``."""
        self.start(i, hashes, full, False)
        self.written(i, hashes)
        self.finish(i)


class PoolInstance(Instance):
    """One serving instance whose cache is a metadata-only ``KVPool`` on the sim clock.

    Admission is the pool's own rule (``peek_admission``); the moves are the
    pool's mechanism (``KVPool.block_pool``: match, touch, allocate, cache,
    release), called directly so a replay costs close to a dictionary loop.
    """

    def __init__(
        self, capacity_blocks: int, block_size: int, policy: Any, clock: SimClock, cost: Any, n: int
    ) -> None:
        super().__init__(capacity_blocks, block_size, cost, n)
        self.pool = metadata_pool(capacity_blocks, block_size, policy, clock)
        self.bp = self.pool.block_pool
        self.policy_name = self.bp.policy.name
        #: ``serve`` runs the pool's one-pass ``BlockPool.serve``: the same moves as
        #: ``start``/``written``/``finish`` when a subclass keeps them and the policy
        #: never refuses a victim (admission of a request that fits the pool then holds)
        kind = type(self)
        self._one_pass = not self.bp.policy_may_refuse and (
            kind.start,
            kind.written,
            kind.finish,
        ) == (PoolInstance.start, PoolInstance.written, PoolInstance.finish)

    @property
    def hits_per_tier(self) -> dict[str, list]:
        return {"gpu": self.hit}

    def start(self, i: int, hashes: list, full: int, anything_running: bool) -> bool:
        """Take request ``i``'s cached run and allocate the rest; False: it must wait."""
        bp = self.bp
        hit = bp.match_prefix(hashes)
        need = full - len(hit)
        if need > len(bp.free_queue):  # the common case skips the query
            reason = self.pool.peek_admission(need, hit)
            if reason is not None:
                if reason == "no_victims" and not anything_running:
                    raise KVNoVictimError(  # nothing will ever be released: waiting is no use
                        f"{self.policy_name}: request {i} needs {need - bp.num_free} victims "
                        "and the policy gives fewer, with nothing running"
                    )
                if not anything_running:
                    raise AssertionError(f"request {i} cannot start in an idle pool")
                return False
        if hit:
            bp.touch(hit)
        before = bp.num_evictions
        try:
            self.held[i] = hit + bp.allocate(need)
        except KVNoVictimError:
            # a policy that names fewer victims than it counted (a structural constraint
            # found only when evicting): give the hits back and wait for a finish
            if hit:
                bp.release(hit)
            if not anything_running:
                raise
            return False
        self.hit[i] = len(hit)
        self.alloc[i] = need
        self.evicted[i] = bp.num_evictions - before
        return True

    def serve(self, i: int, hashes: list, full: int) -> None:
        if not self._one_pass or len(hashes) != full:
            super().serve(i, hashes, full)
            return
        bp = self.bp
        before = bp.num_evictions
        k = bp.serve(hashes)[1]
        self.hit[i] = k
        self.alloc[i] = full - k
        self.evicted[i] = bp.num_evictions - before

    def written(self, i: int, hashes: list) -> None:
        """Prefill ended: the KV is written, its full blocks become hittable."""
        ids = self.held[i]
        if ids:
            self.bp.cache_blocks(ids, hashes, self.hit[i])

    def finish(self, i: int) -> None:
        ids = self.held[i]
        if ids:
            self.bp.release(ids)
        self.held[i] = None


class LayerwiseLoad:
    """Prefill time of a request whose cached blocks load from below the device (lower
    tiers, a shared pool) while it computes, overlapped layer by layer
    (``sim.tiered.ttft_model``); a request with nothing to load takes its compute time."""

    cost: Any
    load: list[float]  #: per request, seconds to load its hits from below the device

    def set_loading(self, bytes_per_block: int, num_layers: int, overlap: bool, n: int) -> None:
        self.bytes_per_block = bytes_per_block
        self.num_layers = num_layers
        self.overlap = overlap
        self.load = [0.0] * n

    def prefill_s(self, i: int, uncached_tokens: int) -> float:
        from .tiered import ttft_model

        compute = self.cost.prefill_s(uncached_tokens)
        load = self.load[i]
        return ttft_model(load, compute, self.num_layers, self.overlap) if load else compute

    def prefill_times(self, compute_s: Any) -> Any:
        import numpy as np

        from .tiered import ttft_model

        load = np.asarray(self.load, dtype=np.float64)
        loaded = ttft_model(load, compute_s, self.num_layers, self.overlap)
        return np.where(load != 0, loaded, compute_s)


class TieredInstance(LayerwiseLoad, Instance):
    """One instance whose cache is a ``KVOffloadManager`` (device tier first, metadata-only).

    Prefill time is the tiered TTFT model: loading the lower tiers' hits over
    their links, overlapped layer by layer with computing the uncached tokens
    (``sim.tiered.ttft_model``).
    """

    def __init__(
        self,
        capacities: dict[str, int],
        block_size: int,
        policy: Any,
        clock: SimClock,
        cost: Any,
        n: int,
        *,
        links: dict,
        bytes_per_block: int,
        num_layers: int,
        overlap: bool,
    ) -> None:
        from sagellm_kv_cache.offload import KVOffloadManager

        super().__init__(next(iter(capacities.values())), block_size, cost, n)
        self.mgr = KVOffloadManager.from_capacities(
            capacities, block_size=block_size, eviction_policy=policy, async_copies=False
        )
        self.tier_names = tuple(self.mgr.tier_names)
        self.policy_name = str(policy)
        self.links = links
        self.set_loading(bytes_per_block, num_layers, overlap, n)
        self.hits_per_tier = {t: [0] * n for t in self.tier_names}
        self.bp = self.mgr.device.block_pool
        #: the offload manager allocates the partial tail block too: it takes capacity
        #: here, and a request is rejected when all its blocks exceed the device tier
        self.lengths: list[int] = []

    def start(self, i: int, hashes: list, full: int, anything_running: bool) -> bool:
        try:
            alloc = self.mgr.allocate(
                block_hashes=hashes, num_tokens=self.lengths[i], request_id=str(i)
            )
        except (KVBudgetExceededError, KVNoVictimError):
            if not anything_running:
                raise
            return False
        look = alloc.lookup
        per = look.hits_per_tier
        for t in self.tier_names:
            self.hits_per_tier[t][i] = per[t]
        self.hit[i] = sum(per.values())
        self.alloc[i] = full - per[self.tier_names[0]]
        bpb = self.bytes_per_block
        links = self.links
        self.load[i] = sum(links[t].load_s(per[t] * bpb) for t in self.tier_names[1:] if t in links)
        self.held[i] = alloc.handle
        return True

    def written(self, i: int, hashes: list) -> None:
        h = self.held[i]
        if h is not None:
            self.mgr.cache_blocks(h)

    def finish(self, i: int) -> None:
        h = self.held[i]
        if h is not None:
            self.mgr.free(h)
        self.held[i] = None

    def close(self) -> dict:
        stats = self.mgr.get_stats()
        self.mgr.check_invariants()
        self.mgr.close()
        return stats
