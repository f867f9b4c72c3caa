"""``SchedulerBridge``: the seed's scheduler facade over the tiered KV cache.

::

    scheduler (batching, priorities)
        |  plan(requests) -> SchedulerPlan      what can run now, and what it costs
        |  allocate_request / free_request      what the engine then does
        v
    SchedulerBridge  (seed API; this module)
        |-- BatchPlanner   plans over the pool's public queries     scheduler_planner.py
        v
    KVCacheManager   (the facade an engine holds: request id -> allocation)   cache_manager.py
        v
    KVOffloadManager (device pool + host / disk tiers)      offload/
        v
    KVPool -> BlockPool -> EvictionPolicy                    pool.py ...

``plan()`` changes nothing (``scheduler_planner.py`` says what a plan answers
and what it costs); ``schedule()`` plans and allocates the admitted requests.

Wait reasons: ``"too_large"`` (more blocks than the device has: it can never
run), ``"no_blocks"`` (not enough free + evictable device blocks now),
``"no_victims"`` (enough evictable blocks, but the policy refuses some now:
TTL-protected, leaf-only), ``"max_num_seqs"``, ``"token_budget"`` (uncached tokens over
``max_num_batched_tokens``), ``"blocked"`` (FCFS: an earlier request waits).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from .cache_manager import KVCacheManager
from .errors import KVBudgetExceededError, KVConfigError, KVInvalidTypeError
from .offload import KVOffloadManager, OffloadAllocation, TierConfig
from .pool import KVPool, check_num_tokens
from .scheduler_checks import (
    check_limit,
    check_prompt,
    check_request_batch,
    check_request_id,
    request_fields,
)
from .scheduler_plan import WAIT_REASONS, RequestPlan, SchedRequest, SchedulerPlan
from .scheduler_planner import BatchPlanner
from .storage import ModelShape

__all__ = [
    "WAIT_REASONS",
    "KVCacheManager",
    "RequestPlan",
    "SchedRequest",
    "SchedulerBridge",
    "SchedulerPlan",
]


class SchedulerBridge:
    """Bridge between a scheduler and the (tiered) KV cache (seed API).

    Args:
        max_tokens: device KV budget in tokens (rounded down to whole blocks).
        block_size: tokens per block.
        enable_prefix_cache: reuse cached prefixes across requests.
        eviction_policy: policy of every tier.
        model_shape: KV geometry; ``None`` for metadata-only planning.
        device: device of the device tier.
        host_max_tokens / disk_max_tokens: lower-tier budgets (0: no such tier).
        disk_dir: folder of the disk tier (needed with a ``model_shape``).
        write_policy / admit_after_hits / promote_on_hit / async_copies:
            see ``KVOffloadManager``.
        max_num_seqs: at most this many requests admitted per plan.
        max_num_batched_tokens: at most this many uncached tokens per plan.
        fcfs: stop admitting at the first request that must wait.
    """

    def __init__(
        self,
        max_tokens: int,
        block_size: int = 16,
        enable_prefix_cache: bool = True,
        eviction_policy: str = "lru",
        *,
        model_shape: ModelShape | str | None = None,
        device: str = "cpu",
        host_max_tokens: int = 0,
        disk_max_tokens: int = 0,
        disk_dir: str | None = None,
        write_policy: str = "write_back",
        admit_after_hits: int = 0,
        promote_on_hit: bool = True,
        async_copies: bool = True,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        fcfs: bool = True,
        hash_fn: str = "sha256",
        extra_keys: Any = None,
        clock=None,
    ) -> None:
        max_num_seqs = check_limit("max_num_seqs", max_num_seqs)
        max_num_batched_tokens = check_limit("max_num_batched_tokens", max_num_batched_tokens)
        pool = KVPool(
            max_tokens,
            block_size=block_size,
            model_shape=model_shape,
            device=device,
            eviction_policy=eviction_policy,
            enable_prefix_caching=enable_prefix_cache,
            hash_fn=hash_fn,
            extra_keys=extra_keys,
            clock=clock,
        )
        tiers = []
        for name, kind, budget in (
            ("cpu", "host", host_max_tokens),
            ("disk", "disk", disk_max_tokens),
        ):
            if budget:
                n = check_num_tokens(budget, f"{name}_max_tokens") // block_size
                if n < 1:
                    raise KVConfigError(f"{name} tier budget holds no full block")
                tiers.append(
                    TierConfig(
                        name,
                        n,
                        kind,
                        eviction_policy,
                        directory=disk_dir if kind == "disk" and model_shape is not None else None,
                    )
                )
        offload = KVOffloadManager(
            pool,
            tiers,
            write_policy=write_policy,
            admit_after_hits=admit_after_hits,
            promote_on_hit=promote_on_hit,
            async_copies=async_copies,
            device_tier_name="gpu" if pool.device.startswith("cuda") else "device",
        )
        self.manager = KVCacheManager(offload)
        self.offload = offload
        self.pool = pool
        self.max_tokens = pool.max_tokens
        self.block_size = block_size
        # the per-plan limits live in the planner (``self.planner.max_num_seqs``...)
        self.planner = BatchPlanner(
            offload,
            self.manager.block_hashes_of,
            enable_prefix_cache=enable_prefix_cache,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            fcfs=fcfs,
        )

    # -- planning ------------------------------------------------------------
    def _as_request(self, r: Any) -> SchedRequest:
        if isinstance(r, SchedRequest):
            req = r
        elif isinstance(r, Mapping):
            req = SchedRequest(*request_fields(r))
        else:
            raise KVInvalidTypeError(
                f"expected a SchedRequest or a mapping, got {type(r).__name__}"
            )
        check_request_id(req.request_id)
        n, hashes = check_prompt(req.num_tokens, req.tokens, req.block_hashes)
        if n is not req.num_tokens or hashes is not None:
            req = SchedRequest(req.request_id, n, req.tokens, hashes)
        return req

    def _as_requests(self, requests: Any) -> list[SchedRequest]:
        """Checked requests: distinct ids, none already running (what executing them needs)."""
        if isinstance(requests, str | bytes | Mapping | SchedRequest) or not isinstance(
            requests, Iterable
        ):
            raise KVInvalidTypeError(
                f"requests must be an iterable of requests, got {type(requests).__name__}"
            )
        reqs = [self._as_request(r) for r in requests]
        check_request_batch([r.request_id for r in reqs], self.manager.allocations)
        return reqs

    def plan(self, requests: Iterable[SchedRequest | Mapping[str, Any]]) -> SchedulerPlan:
        """What allocating ``requests`` in order would do now (changes nothing).

        Returns:
            a ``SchedulerPlan``: the admitted requests with their hit blocks per
            tier and the blocks to allocate, onboard and evict; the others with
            their wait reason.
        """
        reqs = self._as_requests(requests)
        with self.offload.lock:
            return self.planner.plan(reqs)

    def schedule(
        self, requests: Iterable[SchedRequest | Mapping[str, Any]], *, wait: bool = False
    ) -> tuple[SchedulerPlan, list[OffloadAllocation]]:
        """``plan`` then allocate the admitted requests; returns both.

        Every request is checked before anything is allocated (a bad one raises
        with nothing changed). The plan is exact when ``planner.exact`` (see
        ``scheduler_planner``); where it is an estimate (ARC on the device,
        leaf-only or two lower tiers), an admitted request that no longer fits waits
        (``"no_blocks"``, and the rest ``"blocked"`` under ``fcfs``), and the
        returned plan says so. Should an allocation fail otherwise, the
        requests this call allocated are freed again before the error
        propagates.
        """
        reqs = self._as_requests(requests)
        off = self.offload
        with off.lock:
            plan, wanted = self.planner.plan_batch(reqs)
            by_id = {r.request_id: r for r in reqs}
            allocs: list[OffloadAllocation] = []
            stop = False
            exact = self.planner.exact
            # the batch's blocks in lower tiers stay there until their request onboards
            # them (see scheduler_planner): what makes the plan exact
            off.hold(wanted)
            done: list[str] = []
            try:
                for rp in plan.admitted:
                    req = by_id[rp.request_id]
                    if stop:
                        rp.admitted, rp.reason = False, "blocked"
                        continue
                    try:
                        a = self.manager.allocate(
                            rp.request_id,
                            rp.num_tokens,
                            tokens=req.tokens,
                            block_hashes=req.block_hashes,
                        )
                    except KVBudgetExceededError:
                        if exact:
                            raise
                        # only where the plan is an estimate (BatchPlanner.exact): the request
                        # waits, as a planned one would; nothing changed
                        rp.admitted, rp.reason = False, "no_blocks"
                        stop = self.planner.fcfs
                        continue
                    allocs.append(a)
                    done.append(rp.request_id)
                    if wanted and a.evicted_hashes:
                        off.hold([h for h in a.evicted_hashes if h in wanted])
            except BaseException:
                for rid in done:
                    self.manager.free(rid, cache=False)
                raise
            finally:
                off.release_holds()
        if wait:  # every admitted request stays allocated if a copy fails
            for a in allocs:
                a.wait()
        return plan, allocs

    # -- per request (seed API) -----------------------------------------------
    def allocate_request(
        self,
        request_id: str,
        num_tokens: int | None = None,
        *,
        tokens: Any = None,
        block_hashes: Sequence[Hashable] | None = None,
        wait: bool = False,
    ) -> OffloadAllocation:
        """Allocate KV for one request (see ``KVCacheManager.allocate``)."""
        return self.manager.allocate(
            request_id, num_tokens, tokens=tokens, block_hashes=block_hashes, wait=wait
        )

    def free_request(self, request_id: str, *, cache: bool = True) -> None:
        """Release a request's KV (its full blocks stay cached unless ``cache=False``)."""
        self.manager.free(request_id, cache=cache)

    def get_stats(self) -> dict[str, Any]:
        stats = self.manager.get_stats()
        stats["max_tokens"] = self.max_tokens
        stats["block_size"] = self.block_size
        return stats

    def reset(self) -> None:
        self.manager.reset()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> SchedulerBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
