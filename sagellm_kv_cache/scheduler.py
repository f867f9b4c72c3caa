"""The scheduler's view of the KV cache: ``KVCacheManager`` and ``SchedulerBridge``.

::

    scheduler (batching, priorities)
        |  plan(requests) -> SchedulerPlan      what can run now, and what it costs
        |  allocate_request / free_request      what the engine then does
        v
    SchedulerBridge  (seed API)
        v
    KVCacheManager   (the facade an engine holds: request id -> allocation)
        v
    KVOffloadManager (device pool + host / disk tiers)      offload/
        v
    KVPool -> BlockPool -> EvictionPolicy                    pool.py ...

``plan()`` changes nothing. It walks the requests in order over a shadow of
the device pool (free blocks, the policy's victim order, blocks the earlier
requests of the plan take or evict) and answers, per request: hit blocks per
tier, new device blocks to allocate, blocks to onboard from lower tiers,
device blocks its allocation would evict, and, for a request that must wait,
why. Executing the plan in order (``execute``) does exactly that on the
device: the admitted set and the device block counts are exact. Admission is
the pool's own rule (``KVPool.peek_admission`` / ``obtainable_blocks``), and the
victim order is peeked only as far as the admitted requests need (a plan costs
O(its requests' blocks), not O(evictable blocks)). The split of
lower-tier hits is exact too unless a lower tier itself overflows during the
plan (a spill pushing a block the plan counts as a hit further down).

Wait reasons: ``"too_large"`` (more blocks than the device has: it can never
run), ``"no_blocks"`` (not enough free + evictable device blocks now),
``"no_victims"`` (enough evictable blocks, but the policy refuses some now:
TTL-protected, leaf-only), ``"max_num_seqs"``, ``"token_budget"`` (uncached tokens over
``max_num_batched_tokens``), ``"blocked"`` (FCFS: an earlier request waits).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from .compat.cache_manager import CacheManagerSeedMixin
from .errors import KVCacheMissError, KVConfigError, KVInvalidInputError, KVInvalidTypeError
from .handle import KVHandle
from .offload import KVOffloadManager, OffloadAllocation, OffloadLookup, TierConfig
from .pool import KVPool, admission_reason, check_num_tokens
from .scheduler_checks import (
    as_int,
    check_hashes,
    check_limit,
    check_prompt,
    check_request_batch,
    check_request_id,
    check_timeout,
    request_fields,
    sequence_len,
)
from .scheduler_plan import WAIT_REASONS, RequestPlan, SchedRequest, SchedulerPlan
from .storage import ModelShape

__all__ = [
    "WAIT_REASONS",
    "KVCacheManager",
    "RequestPlan",
    "SchedRequest",
    "SchedulerBridge",
    "SchedulerPlan",
]


class KVCacheManager(CacheManagerSeedMixin):
    """The single KV-cache facade an engine holds: request ids over the tiered cache.

    Args:
        offload: the ``KVOffloadManager`` (device pool + lower tiers) to drive.
    """

    def __init__(self, offload: KVOffloadManager) -> None:
        self.offload = offload
        self._requests: dict[str, OffloadAllocation] = {}

    @property
    def pool(self) -> KVPool:
        """The device pool (``write_kv`` / ``read_kv`` on a request's handle)."""
        return self.offload.device

    @property
    def block_size(self) -> int:
        return self.offload.block_size

    def block_hashes_of(self, tokens: Any = None, block_hashes: Any = None) -> list | None:
        if tokens is not None:
            sequence_len(tokens, "tokens")
            return self.pool.compute_block_hashes(tokens)
        return None if block_hashes is None else check_hashes(block_hashes)

    def lookup(self, tokens: Any = None, *, block_hashes: Any = None) -> OffloadLookup:
        """Where the cached prefix of a prompt lives (no side effect)."""
        if tokens is not None and block_hashes is not None:
            raise KVInvalidInputError("give tokens or block_hashes, not both")
        hashes = self.block_hashes_of(tokens, block_hashes)
        if hashes is None:
            raise KVInvalidInputError("lookup needs tokens or block_hashes")
        return self.offload.lookup(hashes)

    def allocate(
        self,
        request_id: str,
        num_tokens: int | None = None,
        *,
        tokens: Any = None,
        block_hashes: Sequence[Hashable] | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> OffloadAllocation:
        """Allocate KV for a request (prefix reuse across tiers when hashes or tokens are given).

        Raises:
            KVInvalidTypeError / KVInvalidInputError: a bad argument (a non-str id,
                a generator or set of tokens, unhashable or ``None`` hashes,
                ``num_tokens`` that disagrees with ``tokens``, a bad ``timeout``),
                or ``request_id`` already holds an allocation. Nothing changed.
            KVBudgetExceededError: it does not fit the device now (nothing changed).
        """
        check_request_id(request_id)
        if request_id in self._requests:
            raise KVInvalidInputError(f"request {request_id!r} already holds KV blocks")
        num_tokens, block_hashes = check_prompt(num_tokens, tokens, block_hashes)
        check_timeout(timeout)
        alloc = self.offload.allocate(
            tokens, block_hashes=block_hashes, num_tokens=num_tokens, request_id=request_id
        )
        self._requests[request_id] = alloc
        if wait:
            alloc.wait(timeout)
        return alloc

    def get_allocation(self, request_id: str) -> OffloadAllocation:
        check_request_id(request_id)
        try:
            return self._requests[request_id]
        except KeyError:
            raise KVCacheMissError(f"no allocation for request {request_id!r}") from None

    def get_handle(self, request_id: str) -> KVHandle:
        return self.get_allocation(request_id).handle

    def cache(self, request_id: str, num_tokens: int | None = None) -> int:
        """Register the request's computed full blocks (their KV is written)."""
        handle = self.get_handle(request_id)
        kwargs = {}
        if num_tokens is not None:
            kwargs["num_tokens"] = n = as_int(num_tokens, "num_tokens")
            if not 0 <= n <= handle.num_tokens:
                raise KVInvalidInputError(f"num_tokens={n} outside [0, {handle.num_tokens}]")
        return self.offload.cache_blocks(handle, **kwargs)

    def free(self, request_id: str, *, cache: bool = True) -> None:
        """Release a request; with ``cache`` its full blocks are registered first."""
        alloc = self.get_allocation(request_id)
        if cache and alloc.handle.block_hashes:
            self.offload.cache_blocks(alloc.handle)
        self.offload.free(alloc.handle)
        del self._requests[request_id]

    @property
    def running(self) -> list[str]:
        return list(self._requests)

    def get_stats(self) -> dict[str, Any]:
        out = self.offload.get_stats()
        out["device_pool"] = self.pool.get_stats()
        out["running_requests"] = len(self._requests)
        return out

    def reset(self) -> None:
        self._requests.clear()
        self.offload.reset()

    def close(self) -> None:
        self.offload.close()

    def check_invariants(self) -> None:
        self.offload.check_invariants()


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
        self.max_tokens = pool.max_tokens
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.fcfs = fcfs

    @property
    def offload(self) -> KVOffloadManager:
        return self.manager.offload

    @property
    def pool(self) -> KVPool:
        return self.manager.pool

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
        check_request_batch([r.request_id for r in reqs], self.manager._requests)
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
            return self._plan(reqs)

    def _plan(self, requests: list[SchedRequest]) -> SchedulerPlan:
        off = self.offload
        pool = self.pool
        bp = pool.block_pool
        bs = self.block_size
        dev_name = off.device_name
        dev_cached = bp.cached if self.enable_prefix_cache else {}
        free = bp.num_free
        # the pool's own admission queries: free + evictable now, and what a hit run takes
        supply = pool.obtainable_blocks()
        victims: list[int] = []  # the policy's victim order, peeked only as far as needed
        cursor = 0
        touched: set[int] = set()  # device blocks the admitted requests' hits take
        touched_ev = 0  # how many of those were evictable (supply they take)
        used = 0  # new blocks the admitted requests take: free ones, then victims
        evicted: dict[Hashable, None] = {}  # hashes the plan evicts from the device
        onboarded: set[Hashable] = set()  # hashes the plan brings onto the device
        plan_hits: Counter = Counter()
        spill_tier = off.tiers[0].name if off.tiers else None
        lower = [(t.name, t.pool.cached) for t in off.tiers]
        out: list[RequestPlan] = []
        n_admitted = 0
        token_budget = self.max_num_batched_tokens
        blocked = False
        for req in requests:
            hashes = self.manager.block_hashes_of(req.tokens, req.block_hashes) or []
            hashes = hashes[: req.num_tokens // bs] if self.enable_prefix_cache else []
            n_total = -(-req.num_tokens // bs)
            per = dict.fromkeys(off.tier_names, 0)
            dev_run = True
            d = 0
            run_ids: list[int] = []
            for h in hashes:
                b = dev_cached.get(h)
                if h in onboarded or (b is not None and h not in evicted):
                    if dev_run:
                        d += 1
                        if b is not None and h not in onboarded:
                            run_ids.append(b)
                    per[dev_name] += 1
                    continue
                dev_run = False
                where = None
                for name, cached in lower:
                    if h in cached:
                        where = name
                        break
                if where is None and h in evicted and spill_tier is not None:
                    hits = off.hit_count(h) + plan_hits[h]
                    if hits >= off.admit_after_hits:
                        where = spill_tier
                if where is None:
                    break
                per[where] += 1
            rp = RequestPlan(req.request_id, req.num_tokens, n_total, per, bs)
            out.append(rp)
            n_hit = sum(per.values())
            n_new = n_total - d
            rp.blocks_to_allocate = n_new  # what it needs, admitted or not
            rp.blocks_to_onboard = n_hit - d
            rest = [b for b in run_ids if b not in touched] if touched else run_ids
            n_ev = supply - pool.obtainable_blocks(rest) if rest else 0
            if blocked:
                rp.reason = "blocked"
            elif n_admitted == 0:  # the shadow is the pool itself: ask it (its rule, once)
                rp.reason = pool.peek_admission(n_new, run_ids)
            else:
                obtainable = supply - n_ev - touched_ev - used
                rp.reason = admission_reason(n_new, d, obtainable, bp.num_blocks)
            if rp.reason is None:
                if self.max_num_seqs is not None and n_admitted >= self.max_num_seqs:
                    rp.reason = "max_num_seqs"
                elif token_budget is not None and rp.num_uncached_tokens > token_budget:
                    rp.reason = "token_budget"
            from_free = min(free, n_new)
            need = n_new - from_free
            c = cursor
            if rp.reason is None and need:
                # victims in policy order, skipping blocks the plan's hits take; at most
                # touched_ev + n_ev of the entries from the cursor on are such blocks
                want = cursor + need + touched_ev + n_ev
                if len(victims) < want:
                    victims = bp.policy.peek_victims(max(want, 2 * len(victims)))
                mine = set(rest) if n_ev else ()
                while len(rp.evict_hashes) < need and c < len(victims):
                    b = victims[c]
                    c += 1
                    if b not in touched and b not in mine:
                        rp.evict_hashes.append(bp.block_hashes[b])
                if len(rp.evict_hashes) < need:  # the policy refuses some evictable blocks
                    rp.evict_hashes.clear()
                    rp.reason = "no_victims"
            if rp.reason is not None:
                blocked = blocked or self.fcfs
                continue
            # admitted: take its hits, then free blocks, then the victims found above
            rp.admitted = True
            n_admitted += 1
            if token_budget is not None:
                token_budget -= rp.num_uncached_tokens
            touched.update(rest)
            touched_ev += n_ev
            used += n_new
            free -= from_free
            cursor = c
            evicted.update(dict.fromkeys(rp.evict_hashes))
            rp.blocks_to_evict = len(rp.evict_hashes)
            for h in hashes[:n_hit]:
                plan_hits[h] += 1
            onboarded.update(hashes[d:n_hit])
        return SchedulerPlan(out, free, supply - touched_ev - used - free)

    def schedule(
        self, requests: Iterable[SchedRequest | Mapping[str, Any]], *, wait: bool = False
    ) -> tuple[SchedulerPlan, list[OffloadAllocation]]:
        """``plan`` then allocate the admitted requests; returns both.

        Every request is checked before anything is allocated (a bad one raises
        with nothing changed); should an allocation still fail, the requests
        this call allocated are freed again before the error propagates.
        """
        reqs = self._as_requests(requests)
        with self.offload.lock:
            plan = self._plan(reqs)
            by_id = {r.request_id: r for r in reqs}
            allocs: list[OffloadAllocation] = []
            try:
                for rp in plan.admitted:
                    req = by_id[rp.request_id]
                    allocs.append(
                        self.manager.allocate(
                            rp.request_id,
                            rp.num_tokens,
                            tokens=req.tokens,
                            block_hashes=req.block_hashes,
                        )
                    )
            except BaseException:
                for rp in plan.admitted[: len(allocs)]:
                    self.manager.free(rp.request_id, cache=False)
                raise
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
