"""``KVOffloadManager``: a device pool over a chain of lower tiers (host memory, disk).

::

    request hashes  h0 h1 h2 h3 h4 h5
    lookup          gpu gpu cpu cpu disk miss      (first tier holding each block; stops at a miss)
                    \\_____/ \\______________/
                   device hit   onboarded: copied up into fresh device blocks
                                before the request runs (future)

    eviction:  device --spill--> host --spill--> disk --drop-->
               (write-back: a block goes down when it is evicted above;
                write-through: it goes down as soon as it is cached on the device)

Write policies (``write_back`` / ``write_through``), ``admit_after_hits`` and
``promote_on_hit`` are described with the write path, in ``chain.py``.

Bytes move in one worker thread: each call plans the metadata under the
lock and queues the copies as a typed ``CopyPlan`` (``plan.py``, planned by
``device_plan.py``) whose ``Future`` the engine waits on before it runs the
request (or writes into its blocks); the spill / write-through / admission
chain is ``chain.py``. Plans run in order, so a later one never overtakes the
copies of an earlier one. Metadata-only managers (trace replay) queue nothing.

Onboarded blocks become hittable only once their bytes are in place and
verified; a failed onboarding is a miss (``handle.num_cached_tokens`` drops to
the verified prefix before the future resolves), a failed lower-tier write
means the block is not stored: ``jobs.py`` has the whole story.

The device pool must be driven through this manager (or ``KVCacheManager``):
its eviction hook stages an evicted block's bytes before the caller can
overwrite them; an eviction caused outside the manager is spilled at once,
synchronously, from inside the hook.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from ..compat.offload_seed import OffloadSeedMixin
from ..errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError
from ..handle import HandleState, KVHandle
from ..hashing import check_block_hashes
from ..pool import KVPool, check_num_tokens
from ..storage import ModelShape
from .build import make_tier, pool_and_tiers
from .chain import Admission
from .device_plan import DeviceEvents, DevicePlanner
from .jobs import CopyQueue
from .plan import CopyPlan
from .report import check_chain, read_cached_block, stats_report
from .results import OffloadAllocation, OffloadLookup, OnboardResult
from .tiers import LowerTier, TierConfig, TierStats

__all__ = [
    "WRITE_POLICIES",
    "KVOffloadManager",
    "OffloadAllocation",
    "OffloadLookup",
    "OnboardResult",
]

WRITE_POLICIES = ("write_back", "write_through")


class KVOffloadManager(OffloadSeedMixin):
    """A device ``KVPool`` over a chain of lower tiers.

    Args:
        device_pool: the pool requests run in (GPU, or CPU on a CPU-only host).
            With KV tensors, the lower tiers hold tensors / files too; a
            metadata-only pool makes every tier metadata-only.
        tiers: lower tiers, top down (``TierConfig`` or dicts of its fields).
        write_policy: ``"write_back"`` or ``"write_through"``.
        admit_after_hits: hits a block needs before it may enter a lower tier.
        promote_on_hit: move (True, exclusive) or copy (False) lower-tier hits up.
        async_copies: move bytes in a worker thread (False: inline, the future
            is done on return).
        pin_host_memory: page-lock host tiers when CUDA is present.

    Raises:
        KVConfigError: bad policy, duplicate tier names, a data tier without a
            directory or a metadata-only chain with one.
    """

    def __init__(
        self,
        device_pool: KVPool,
        tiers: Sequence[TierConfig | Mapping[str, Any]] = (),
        *,
        write_policy: str = "write_back",
        admit_after_hits: int = 0,
        promote_on_hit: bool = True,
        async_copies: bool = True,
        pin_host_memory: bool = True,
        device_tier_name: str | None = None,
    ) -> None:
        if write_policy not in WRITE_POLICIES:
            raise KVConfigError(
                f"unknown write_policy {write_policy!r}; choose one of {WRITE_POLICIES}"
            )
        if isinstance(admit_after_hits, bool) or not isinstance(admit_after_hits, int):
            raise KVConfigError("admit_after_hits must be an int")
        if admit_after_hits < 0:
            raise KVConfigError(f"admit_after_hits must be >= 0, got {admit_after_hits}")
        self.device = device_pool
        self.block_size = device_pool.block_size
        self.write_policy = write_policy
        self._write_through = write_policy == "write_through"
        self.admit_after_hits = admit_after_hits
        self.promote_on_hit = promote_on_hit and not self._write_through
        self.async_copies = async_copies
        self.device_name = device_tier_name or device_pool.tier
        configs = [t if isinstance(t, TierConfig) else TierConfig(**t) for t in tiers]
        names = [self.device_name, *(c.name for c in configs)]
        if len(set(names)) != len(names):
            raise KVConfigError(f"tier names must be unique, got {names}")
        self.tier_names = names
        self.has_data = device_pool.storage is not None
        shape = device_pool.model_shape
        self.block_nbytes = shape.bytes_per_block(self.block_size) if shape is not None else 0
        self.tiers: list[LowerTier] = []
        try:
            for c in configs:
                self.tiers.append(make_tier(device_pool, c, pin_host_memory))
        except BaseException:
            for t in self.tiers:
                t.close()
            raise
        self._lock = threading.RLock()
        self._depth = 0
        self._owner = 0
        self.admission = Admission(admit_after_hits, self._held)
        self._hits = self.admission.hits  # the same dict (``hit_counts()`` is the public view)
        self._planner = DevicePlanner(
            device_pool,
            self.device_name,
            self.tiers,
            self.tier,
            self.admission,
            self.block_nbytes,
            promote_on_hit=self.promote_on_hit,
            write_through=self._write_through,
        )
        self._queue = CopyQueue(async_copies)
        self._hook = DeviceEvents(self._planner, self.in_call, self.flush)
        device_pool.add_hook(self._hook)
        self._reset_counters()
        self._closed = False

    @classmethod
    def from_capacities(
        cls,
        capacities: Mapping[str, int],
        *,
        block_size: int = 16,
        model_shape: ModelShape | str | None = None,
        device: str = "cpu",
        eviction_policy: str = "lru",
        disk_dir: str | None = None,
        clock=None,
        **kwargs: Any,
    ) -> KVOffloadManager:
        """A manager from ``{"gpu": blocks, "cpu": blocks, "disk": blocks}`` (first = device).

        Tier names ``disk``/``nvme``/``ssd`` are disk tiers (files under
        ``disk_dir`` when ``model_shape`` is given); others are host tiers.
        """
        pool, configs = pool_and_tiers(
            capacities,
            block_size=block_size,
            model_shape=model_shape,
            device=device,
            eviction_policy=eviction_policy,
            disk_dir=disk_dir,
            clock=clock,
        )
        return cls(pool, configs, device_tier_name=pool.tier, **kwargs)

    def _reset_counters(self) -> None:
        self.num_requests = 0
        self.num_hit_requests = 0
        self.query_blocks = 0
        self.query_tokens = 0

    def _held(self, block_hash: Hashable) -> bool:
        return block_hash in self.device.block_pool.cached or any(
            block_hash in t for t in self.tiers
        )

    # -- call bookkeeping ----------------------------------------------------
    @contextmanager
    def _call(self) -> Iterator[None]:
        """Hold the lock, settle finished plans, and mark the thread as inside a call
        (device hook events are then drained by the call, not flushed at once)."""
        with self._lock:
            if not self._depth:
                self._owner = threading.get_ident()
            self._depth += 1
            try:
                self._queue.settle(self._apply)
                yield
            finally:
                self._depth -= 1

    def in_call(self) -> bool:
        """Whether this thread is inside a manager call (device events wait for its drain)."""
        return bool(self._depth) and self._owner == threading.get_ident()

    def flush(self) -> None:
        """Spill / write down what the device pool did outside any manager call, now
        (before an evicted block can be overwritten)."""
        with self._call():
            plan = CopyPlan()
            self._planner.drain(plan)
            self._queue.run_inline(plan, self._apply)

    def _submit(self, plan: CopyPlan, result: OnboardResult | None = None) -> Future:
        return self._queue.submit(plan, result or _result(()), self._apply)

    def settle(self) -> None:
        """Apply what finished copy plans learnt (verified blocks, failed copies)."""
        with self._call():
            pass

    def _apply(self, plan: CopyPlan) -> None:
        """Settle one finished plan (inside a call): see ``jobs.py``."""
        for tier, h, gen, kind, _exc in plan.drops:
            if kind == "read":
                tier.stats.read_errors += 1
            elif kind == "write":
                tier.stats.write_errors += 1
            if tier.drop_if_current(h, gen):
                self.admission.forget([h])
        ob = plan.onboarding
        if ob is None or ob.num_verified <= ob.first or ob.handle.state is HandleState.FREED:
            return
        # exactly first .. verified: the bytes are in place (the handle's count moved on);
        # they were removed from (or refreshed in) their tier at planning: nothing moves now
        cached = self._planner.newly_cached
        n0 = len(cached)
        self.device.register_blocks(ob.handle, ob.hashes[: ob.num_verified], ob.first)
        del cached[n0:]

    def _await_onboarding(self, handle: KVHandle) -> None:
        """Let the handle's own onboarding finish and settle (before it is freed or cached)."""
        pending = self._queue.onboarding
        if pending and pending.get(handle.handle_id) is not None:
            self._queue.wait_for(handle.handle_id)
            self._queue.settle(self._apply)

    def wait_all(self, timeout: float | None = None) -> None:
        """Block until every queued copy has run (errors stay with their futures)."""
        self._queue.wait_all(timeout)

    # -- lookup --------------------------------------------------------------
    def lookup(self, block_hashes: Sequence[Hashable]) -> OffloadLookup:
        """Longest prefix held across tiers and the tier of each of its blocks (no side effect).

        Blocks being onboarded are in no tier until verified: a miss here.
        """
        hashes = check_block_hashes(block_hashes)
        with self._call():
            return self._lookup(hashes)

    def _lookup(self, block_hashes: Sequence[Hashable]) -> OffloadLookup:
        dev_cached = self.device.block_pool.cached if self.device.enable_prefix_caching else {}
        lower = [(t.name, t.pool.cached) for t in self.tiers]
        names: list[str] = []
        dev = self.device_name
        for h in block_hashes:
            if h in dev_cached:
                names.append(dev)
                continue
            for name, cached in lower:
                if h in cached:
                    names.append(name)
                    break
            else:
                break
        per = dict.fromkeys(self.tier_names, 0)
        for n in names:
            per[n] += 1
        return OffloadLookup(len(names), names, per, len(block_hashes), self.block_size, dev)

    # -- allocation ----------------------------------------------------------
    def allocate(
        self,
        tokens: Any = None,
        *,
        block_hashes: Sequence[Hashable] | None = None,
        num_tokens: int | None = None,
        request_id: str | None = None,
        extra_keys: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> OffloadAllocation:
        """Allocate a request on the device with its cached prefix from every tier.

        Device hits are referenced; blocks hit in a lower tier get fresh device
        blocks, their bytes copied up by the returned allocation's future; they
        are registered in the device cache once verified (a failed one is a
        miss: ``handle.num_cached_tokens`` drops to the verified prefix before
        the future resolves). Device victims spill down. Pass ``tokens`` or
        ``block_hashes`` plus ``num_tokens``.

        Raises:
            KVBudgetExceededError: the request does not fit the device even
                after eviction (nothing changed in any tier).
        """
        if tokens is not None:
            if block_hashes is not None:
                raise KVInvalidInputError("give tokens or block_hashes, not both")
            block_hashes = self.device.compute_block_hashes(tokens, extra_keys)
            if num_tokens is None:
                num_tokens = len(tokens)
        if block_hashes is None and num_tokens is not None:
            return self._allocate_plain(num_tokens, request_id, metadata)
        if block_hashes is None or num_tokens is None:
            raise KVInvalidInputError("allocate needs tokens, block_hashes or num_tokens")
        num_tokens = check_num_tokens(num_tokens)
        block_hashes = check_block_hashes(block_hashes)  # before the lookup touches any index
        hashes = block_hashes[: num_tokens // self.block_size]
        with self._call():
            look = self._lookup(hashes)
            self._planner.victims.clear()
            handle, dev_hit_tokens = self.device.alloc_with_prefix(
                block_hashes=block_hashes,
                num_tokens=num_tokens,
                request_id=request_id,
                metadata=metadata,
            )
            victims = self._planner.take_victims()
            self._count_request(look, hashes, num_tokens)  # admission counts before the spill
            # two plans, run in this order: what the request waits for (its victims staged
            # and spilled, its onboarded blocks in place), then the files of the blocks it
            # promoted out of a disk tier removed (no request waits for that)
            plan, rest = CopyPlan(), CopyPlan()
            result = _result(self.tier_names, failed=True)
            d = dev_hit_tokens // self.block_size
            ob = self._planner.plan_allocation(plan, rest, handle, hashes, look, d, victims, result)
            if ob is not None and not self.has_data:  # metadata-only: nothing to move or verify
                ob.verified.update(range(ob.first, ob.num_hit))
                ob.finish([])
                done = CopyPlan()
                done.onboarding = ob
                self._apply(done)
            else:
                plan.onboarding = ob
            if self._write_through and self.admit_after_hits:
                n = self.admit_after_hits
                ripe = [
                    (handle.block_ids[p], hashes[p])
                    for p in range(look.num_hit_blocks)
                    if self.admission.hit_count(hashes[p]) == n
                ]
                self._planner.write_down(ripe, plan)
            self._planner.drain(plan)
            fut = self._submit(plan, result)
            self._submit(rest)
            return OffloadAllocation(handle, look, fut, [h for _, h in victims], self)

    def _count_request(self, look: OffloadLookup, hashes: list[Hashable], num_tokens: int) -> None:
        self.admission.count(hashes[: look.num_hit_blocks])
        if look.num_hit_blocks:
            self.num_hit_requests += 1
        for name, n in look.hits_per_tier.items():
            self.tier_stats(name).hit_blocks += n
        self.num_requests += 1
        self.query_blocks += len(hashes)
        self.query_tokens += num_tokens

    def _allocate_plain(
        self, num_tokens: int, request_id: str | None, metadata: dict[str, Any] | None
    ) -> OffloadAllocation:
        """No prefix information: device blocks only (victims still spill down)."""
        with self._call():
            meta = dict(metadata or {})
            if request_id is not None:
                meta["request_id"] = request_id
            self._planner.victims.clear()
            handle = self.device.alloc(num_tokens, metadata=meta)
            evicted = [h for _, h in self._planner.victims]
            self.num_requests += 1
            self.query_tokens += num_tokens
            plan = CopyPlan()
            self._planner.drain(plan)
            look = OffloadLookup(
                0, [], dict.fromkeys(self.tier_names, 0), 0, self.block_size, self.device_name
            )
            fut = self._submit(plan, _result(self.tier_names))
            return OffloadAllocation(handle, look, fut, evicted, self)

    def tier(self, name: str) -> LowerTier:
        """The lower tier called ``name``."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise KVInvalidInputError(f"no tier named {name!r}; tiers are {self.tier_names}")

    def lower_tier_of(self, block_hash: Hashable) -> str | None:
        """The first lower tier holding ``block_hash`` (``None``: none does)."""
        for t in self.tiers:
            if block_hash in t:
                return t.name
        return None

    def hold(self, block_hashes: Collection[Hashable]) -> None:
        """Keep ``block_hashes`` wherever a lower tier holds them until ``release_holds``:
        spills evict other blocks meanwhile. A scheduled batch holds the blocks its
        requests will onboard (as vLLM's offloading ``prepare_load`` does), so an earlier
        request's spill cannot push out what a later one was planned to hit. Call it
        under ``lock`` and release in the same critical section."""
        for t in self.tiers:
            t.hold(block_hashes)

    def release_holds(self) -> None:
        """End every ``hold`` (the blocks become evictable again, as just used)."""
        for t in self.tiers:
            t.release_holds()

    def tier_stats(self, name: str) -> TierStats:
        """The counters of tier ``name`` (the device's included)."""
        return self.device_stats if name == self.device_name else self.tier(name).stats

    @property
    def device_stats(self) -> TierStats:
        """Counters of the device tier."""
        return self._planner.stats

    # -- the rest of a request's life ----------------------------------------
    def cache_blocks(self, handle: KVHandle, **kwargs: Any) -> int:
        """``KVPool.cache_blocks`` (write-through copies the new blocks down).

        Waits for the handle's own onboarding first: only its verified prefix
        counts as cached, the rest must have been computed.
        """
        with self._call():
            self._await_onboarding(handle)
            n = self.device.cache_blocks(handle, **kwargs)
            plan = CopyPlan()
            self._planner.drain(plan)
            self._submit(plan)
            return n

    def free(self, handle: KVHandle) -> None:
        """``KVPool.free``: the handle's cached blocks stay on the device, evictable.

        Waits for the handle's own onboarding first (no copy may land in a
        block that was handed to someone else).
        """
        with self._call():
            self._await_onboarding(handle)
            self.device.free(handle)

    def evict(self, num_blocks: int) -> Future:
        """Evict ``num_blocks`` device blocks now (spilled down); a future for the copies."""
        with self._call():
            self.device.evict(num_blocks)
            plan = CopyPlan()
            self._planner.drain(plan)
            return self._submit(plan)

    def invalidate(self, block_hashes: Sequence[Hashable]) -> int:
        """Drop these hashes from every tier (stale KV). Returns blocks dropped."""
        with self._call():
            victims = self._planner.victims
            n0 = len(victims)
            n = self.device.invalidate(block_hashes)
            del victims[n0:]  # stale KV is dropped, never spilled
            for tier in self.tiers:
                present = [h for h in block_hashes if h in tier]
                if present:
                    plan = CopyPlan()
                    tier.remove(present, plan)
                    self._queue.run_inline(plan, self._apply)
                    n += len(present)
            self.admission.discard(block_hashes)
            return n

    def read_block(self, block_hash: Hashable) -> tuple[str, Any]:
        """The bytes of a cached block from the first tier holding it (tests, debugging).

        Returns ``(tier name, tensor [L, 2, 1, <block dims>])``.

        Raises:
            KVCacheMissError: no tier holds it.
            KVConfigError: the manager is metadata-only.
        """
        _check_hashable(block_hash)
        with self._lock:
            self.wait_all()
            with self._call():
                return read_cached_block(self, block_hash)

    def where(self, block_hash: Hashable) -> list[str]:
        """Names of the tiers holding ``block_hash`` (top down)."""
        _check_hashable(block_hash)
        with self._call():
            out = [self.device_name] if block_hash in self.device.block_pool.cached else []
            return out + [t.name for t in self.tiers if block_hash in t]

    # -- stats and lifecycle -------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        """Per-tier counters and hit ratios (block and token)."""
        with self._call():
            return stats_report(self)

    def reset(self) -> None:
        """Free every handle, empty every tier (disk files included), zero counters."""
        with self._call():
            self.wait_all()
            self._queue.clear()  # their handles die with the reset
            self.device.reset()
            for t in self.tiers:
                t.reset()
            self._planner.stats = TierStats(self.device_name, self.device.num_blocks)
            self.admission.hits.clear()
            self._planner.victims.clear()
            self._planner.newly_cached.clear()
            self._reset_counters()

    def close(self) -> None:
        """Finish queued copies and release the disk directories (files stay)."""
        if self._closed:
            return
        self.wait_all()
        self.settle()
        self._queue.shutdown()
        for t in self.tiers:
            t.close()
        if self._hook in self.device.hooks:
            self.device.remove_hook(self._hook)
        self._closed = True

    def __enter__(self) -> KVOffloadManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def lock(self) -> threading.RLock:
        """The manager's re-entrant lock: hold it to plan against a consistent
        view of every tier (``SchedulerBridge`` plans and allocates under it)."""
        return self._lock

    def hit_count(self, block_hash: Hashable) -> int:
        """The hit count ``admit_after_hits`` compares against for ``block_hash``
        (0 when the rule is off or the hash is not counted)."""
        return self.admission.hit_count(block_hash)

    def hit_counts(self) -> dict[Hashable, int]:
        """A copy of every counted hit (``admit_after_hits``; empty when it is 0)."""
        return dict(self.admission.hits)

    def check_invariants(self) -> None:
        """Every tier within budget; exclusive chains hold each block once; the
        files of a disk tier are its index (after the queued copies ran and settled)."""
        with self._lock:
            self.wait_all()
            self.settle()
            check_chain(self)

    def __repr__(self) -> str:
        caps = ", ".join(
            [f"{self.device_name}={self.device.num_blocks}"]
            + [f"{t.name}={t.num_blocks}" for t in self.tiers]
        )
        return f"KVOffloadManager({caps}, {self.write_policy})"


def _result(tier_names: Sequence[str], *, failed: bool = False) -> OnboardResult:
    """An empty ``OnboardResult`` with a zero per tier (``failed``: blocks_failed too)."""
    zeros = dict.fromkeys(tier_names, 0)
    return OnboardResult(dict(zeros), dict(zeros), 0, 0.0, dict(zeros) if failed else {})


def _check_hashable(block_hash: Any) -> None:
    try:
        hash(block_hash)
    except TypeError:
        raise KVInvalidTypeError(
            f"a block hash must be hashable, got {type(block_hash).__name__}"
        ) from None
