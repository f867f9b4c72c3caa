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

Write policies:

* ``write_policy="write_back"`` (default): a block evicted from a tier is
  inserted at the most recent end of the tier below (if admitted), whose own
  victims go one further down; the last tier drops its victims.
* ``write_policy="write_through"``: a block is written to every lower tier as
  soon as it is cached on the device (or, with ``admit_after_hits=N``, when
  its N-th hit is seen); eviction then only refreshes the copy below.
* ``admit_after_hits=N``: a block enters a lower tier only once it has been
  hit N times (0: always).
* ``promote_on_hit=True``: a hit in a lower tier *moves* the block up
  (exclusive caching: each block lives in one tier); ``False`` copies it and
  refreshes the lower copy (inclusive). Write-through is always inclusive.

Why an exclusive chain of LRU tiers equals one LRU of the summed size (what
``tests/test_tiered_replay.py`` pins): put the lower tier's order before the
device's, least recent first. A device victim is the device's least recent
block and enters the tier below as its most recent one, so the concatenated
order is unchanged by a spill; the lower tier drops from its least recent
end, which is the global least recent block; a hit anywhere takes the block
out of the order and its release puts it at the global most recent end, as
in one pool. Promotions leave the lower tier before spills enter it, so the
free slots add up as well: the chain evicts exactly the blocks, in the same
order, that one pool of ``sum(capacities)`` blocks would.

Bytes move in one worker thread: each call plans the metadata under the
lock and queues the copies as one job whose ``Future`` the engine waits on
before it runs the request (or writes into its blocks). Jobs run in order, so
a later job never overtakes the copies of an earlier one. Metadata-only
managers (trace replay) queue nothing.

Onboarded blocks become hittable only once their bytes are in place and
verified (``jobs.py`` has the whole story):

* while in flight they are in no tier's index: a second request for the same
  prefix misses them and computes them itself (it never waits on, nor shares,
  another request's onboarding);
* a failed onboarding (missing file, checksum mismatch, I/O error) is a miss:
  the future resolves, ``handle.num_cached_tokens`` is lowered to the verified
  prefix before it does (read it after ``wait()``), the engine computes the
  rest; ``OnboardResult.blocks_failed`` / ``errors`` name what failed; the bad
  copy is dropped from its tier, so the next request recomputes too; the
  device blocks stay the handle's, to write and cache or free as usual;
* a lower-tier write that fails (disk full) means the block is not stored
  (``TierStats.write_errors``); no request's future fails for it.

The device pool must be driven through this manager (or ``KVCacheManager``):
its eviction hook stages an evicted block's bytes before the caller can
overwrite them; an eviction caused outside the manager is spilled at once,
synchronously, from inside the hook.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from ..compat.offload_seed import OffloadSeedMixin
from ..errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError
from ..handle import HandleState, KVHandle
from ..hashing import check_block_hashes
from ..hooks import PoolHook
from ..pool import KVPool, check_num_tokens
from ..storage import KVStorage, ModelShape
from .jobs import CopyQueue, Job, Onboarding
from .results import OffloadAllocation, OffloadLookup, OnboardResult
from .staging import _select_op, staged_as_tensor
from .tiers import (
    LowerTier,
    TierConfig,
    TierKind,
    TierStats,
)

__all__ = [
    "WRITE_POLICIES",
    "KVOffloadManager",
    "OffloadAllocation",
    "OffloadLookup",
    "OnboardResult",
]

WRITE_POLICIES = ("write_back", "write_through")


class _DeviceHook(PoolHook):
    """Stages device evictions (write-back) and new cached blocks (write-through)."""

    def __init__(self, manager: KVOffloadManager) -> None:
        self.manager = manager

    def on_evict(self, block_id, block_hash, reason, timestamp) -> None:
        m = self.manager
        if m._suppress_evict_hook:
            return
        m._device_victims.append((block_id, block_hash))
        if not m._in_call():  # eviction from outside the manager: spill now, before reuse
            m._flush_outside_call()

    def on_block_cached(self, block_id, block_hash, parent_hash, timestamp) -> None:
        m = self.manager
        if m._suppress_cached_hook:
            return
        if m._write_through or (m._exclusive and any(block_hash in t for t in m.tiers)):
            m._newly_cached.append((block_id, block_hash))
            if not m._in_call():
                m._flush_outside_call()


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
        # exclusive chain: a block computed on the device while a lower tier
        # holds it (two requests computed it; one copy went down) drops the lower copy
        self._exclusive = self.promote_on_hit and bool(configs)
        storage = device_pool.storage
        self.has_data = storage is not None
        self.block_nbytes = (
            device_pool.model_shape.bytes_per_block(self.block_size)
            if device_pool.model_shape is not None
            else 0
        )
        self.tiers: list[LowerTier] = []
        try:
            for c in configs:
                self.tiers.append(self._make_tier(c, pin_host_memory))
        except BaseException:
            for t in self.tiers:
                t.close()
            raise
        self.device_stats = TierStats(self.device_name, device_pool.num_blocks)
        self._lock = threading.RLock()
        self._depth = 0
        self._owner = 0
        self._suppress_evict_hook = False
        self._suppress_cached_hook = False
        self._device_victims: list[tuple[int, Hashable]] = []
        self._newly_cached: list[tuple[int, Hashable]] = []
        self._hits: dict[Hashable, int] = {}
        self._queue = CopyQueue(async_copies)
        self._job_seq = 0
        self._hook = _DeviceHook(self)
        device_pool.add_hook(self._hook)
        self._reset_counters()
        self._closed = False

    # -- construction --------------------------------------------------------
    def _make_tier(self, c: TierConfig, pin_host_memory: bool) -> LowerTier:
        dev = self.device
        storage = dev.storage
        if storage is None:
            if c.directory is not None:
                raise KVConfigError(
                    f"tier {c.name}: a metadata-only device pool cannot back a disk directory"
                )
            return LowerTier(c, self.block_size, clock=dev.clock)
        if c.kind == TierKind.DISK.value and c.directory is None:
            raise KVConfigError(f"disk tier {c.name} needs a directory when the pool holds KV")
        dims = (*storage.kv.shape[:2], 1, *storage.kv.shape[3:])
        geometry = f"{storage.dtype}|{storage.layout}|{'x'.join(map(str, dims))}"

        def host_storage(n: int) -> KVStorage:
            return KVStorage(
                n,
                self.block_size,
                dev.model_shape,
                "cpu",
                storage.layout,
                pin_memory=pin_host_memory,
            )

        return LowerTier(
            c,
            self.block_size,
            storage_factory=host_storage,
            block_nbytes=storage.bytes_per_block,
            geometry=geometry,
            block_dims=dims,
            storage_dtype=storage.storage_dtype,
            clock=dev.clock,
        )

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
        items = list(capacities.items())
        if not items:
            raise KVConfigError("capacities needs at least the device tier")
        (dev_name, dev_blocks), lower = items[0], items[1:]
        pool = KVPool(
            num_blocks=dev_blocks,
            block_size=block_size,
            model_shape=model_shape,
            device=device,
            eviction_policy=eviction_policy,
            clock=clock,
            tier=dev_name,
        )
        configs = []
        for name, n in lower:
            is_disk = name.lower() in ("disk", "nvme", "ssd")
            configs.append(
                TierConfig(
                    name=name,
                    num_blocks=n,
                    kind="disk" if is_disk else "host",
                    eviction_policy=eviction_policy,
                    directory=disk_dir if (is_disk and model_shape is not None) else None,
                )
            )
        return cls(pool, configs, device_tier_name=dev_name, **kwargs)

    def _reset_counters(self) -> None:
        self.num_requests = 0
        self.num_hit_requests = 0
        self.query_blocks = 0
        self.query_tokens = 0

    # -- call bookkeeping ----------------------------------------------------
    @contextmanager
    def _call(self):
        with self._lock:
            if not self._depth:
                self._owner = threading.get_ident()
            self._depth += 1
            try:
                self._queue.settle(self._apply)
                yield
            finally:
                self._depth -= 1

    def _in_call(self) -> bool:
        return bool(self._depth) and self._owner == threading.get_ident()

    def _flush_outside_call(self) -> None:
        with self._call():
            job = Job()
            self._drain_staged(job)
            self._run_inline(job)

    def _run_inline(self, job: Job) -> None:
        self._queue.run_inline(job, self._apply)

    def _submit(self, job: Job, result: OnboardResult) -> Future:
        return self._queue.submit(job, result, self._apply)

    def _settle_now(self) -> None:
        """Apply what finished copy jobs learnt (verified blocks, failed copies)."""
        with self._lock:
            self._queue.settle(self._apply)

    def _apply(self, job: Job) -> None:
        """Settle one finished job (under the lock): see ``jobs.py``."""
        for tier, h, gen, kind, _exc in job.drops:
            if kind == "read":
                tier.stats.read_errors += 1
            elif kind == "write":
                tier.stats.write_errors += 1
            else:
                tier.stats.extra[f"{kind}_errors"] = tier.stats.extra.get(f"{kind}_errors", 0) + 1
            if tier.drop_if_current(h, gen):
                self._forget([h])
        ob = job.onboarding
        if ob is None or ob.num_verified <= ob.first or ob.handle.state is HandleState.FREED:
            return
        dev = self.device
        handle = ob.handle
        self._suppress_cached_hook = True
        try:
            # exactly first .. verified: the bytes are in place (the handle's count moved on)
            dev.register_blocks(handle, ob.hashes[: ob.num_verified], ob.first)
        finally:
            self._suppress_cached_hook = False

    def _await_onboarding(self, handle: KVHandle) -> None:
        """Let the handle's own onboarding finish and settle (before it is freed or cached)."""
        pending = self._queue.onboarding
        if pending and pending.get(getattr(handle, "handle_id", None)) is not None:
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
        with self._lock:
            self._queue.settle(self._apply)
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
            dev = self.device
            self._device_victims.clear()
            handle, dev_hit_tokens = dev.alloc_with_prefix(
                block_hashes=block_hashes,
                num_tokens=num_tokens,
                request_id=request_id,
                metadata=metadata,
            )
            d = dev_hit_tokens // self.block_size
            n_hit = look.num_hit_blocks
            ops = Job()
            result = OnboardResult(
                dict.fromkeys(self.tier_names, 0),
                dict.fromkeys(self.tier_names, 0),
                0,
                0.0,
                dict.fromkeys(self.tier_names, 0),
            )
            victims = list(self._device_victims)
            self._device_victims.clear()
            evicted_hashes = [h for _, h in victims]
            victim_pos = {h: i for i, h in enumerate(evicted_hashes)}
            # 1. stage what leaves the device before anything overwrites it
            if victims and self.has_data:
                ids = [b for b, _ in victims]
                storage = dev.storage
                ops.append(
                    lambda staged, ids=ids: staged.__setitem__(
                        "dev:victims", storage.read_blocks(ids)
                    )
                )
            # 2. stage the blocks to onboard, grouped by source
            groups: dict[str, tuple[list[int], list[Hashable]]] = {}
            sources = []
            for pos in range(d, n_hit):
                h = hashes[pos]
                src = look.tiers[pos]
                if src == self.device_name:  # a device block after a non-device one
                    src = "dev:victims" if h in victim_pos else "dev:copy"
                sources.append(None if src.startswith("dev:") else src)  # counted per lower tier
                groups.setdefault(src, ([], []))[0].append(pos)
                groups[src][1].append(h)
            dev_ids = {}
            for src, (positions, hs) in groups.items():
                dev_ids[src] = [handle.block_ids[p] for p in positions]
                if src == "dev:copy" and self.has_data:
                    ids = [dev.block_pool.cached[h] for h in hs]
                    storage = dev.storage
                    ops.append(
                        lambda staged, ids=ids, storage=storage: staged.__setitem__(
                            "dev:copy", storage.read_blocks(ids)
                        )
                    )
                elif src == "dev:victims":
                    idx = [victim_pos[h] for h in hs]
                    ops.append(_select_op("dev:victims", "onboard:dev:victims", idx))
                else:
                    tier = self._tier(src)
                    op = tier.read_op(hs, f"onboard:{src}", job=ops, requested=True)
                    if op is not None:
                        ops.append(op)
                    result.bytes_onboarded[src] += len(hs) * self.block_nbytes
                    if self.promote_on_hit:
                        tier.remove(hs, ops)
                    else:
                        tier.refresh(hs)
            # 3. hits (admission counts), then spill the device victims down
            for pos in range(n_hit):
                self._count_hit(hashes[pos])
            if look.num_hit_blocks:
                self.num_hit_requests += 1
            for name, n in look.hits_per_tier.items():
                self._stats(name).hit_blocks += n
            self.num_requests += 1
            self.query_blocks += len(hashes)
            self.query_tokens += num_tokens
            self.device_stats.evicted_blocks += len(victims)
            spill, key = evicted_hashes, "dev:victims"
            back = groups.get("dev:victims")
            if back and self._exclusive and not self._write_through:
                # victims this request onboards right back: an exclusive chain
                # moves them up again, it does not also keep them below
                back_set = set(back[1])
                keep = [i for i, h in enumerate(evicted_hashes) if h not in back_set]
                spill = [evicted_hashes[i] for i in keep]
                key = "dev:victims|spilled"
                if self.has_data:
                    ops.append(_select_op("dev:victims", key, keep))
            result.blocks_spilled = self._spill(spill, key, ops, from_device=True)
            # 4. write the onboarded bytes into the device blocks; 5. they become
            # hittable once verified (settle), a failure is a miss (jobs.py)
            onboarded = n_hit - d
            self.device_stats.blocks_in += onboarded
            self.device_stats.bytes_in += onboarded * self.block_nbytes
            if onboarded:
                ob = Onboarding(handle, hashes[:n_hit], d, n_hit, sources, result)
                ops.onboarding = ob
                if self.has_data:
                    for src, ids in dev_ids.items():
                        key = src if src == "dev:copy" else f"onboard:{src}"
                        ops.append(self._onboard_op(ids, groups[src][0], key, ob))
                else:  # metadata-only: nothing to move, nothing to verify
                    ob.verified.update(range(d, n_hit))
                    ob.finish([])
                    ops.onboarding = None
                    done = Job()
                    done.onboarding = ob
                    self._apply(done)
            if self._write_through and self.admit_after_hits:
                ripe = [
                    (handle.block_ids[p], hashes[p])
                    for p in range(n_hit)
                    if self._hits.get(hashes[p], 0) == self.admit_after_hits
                ]
                self._write_down(ripe, ops)
            self._drain_staged(ops)
            fut = self._submit(ops, result)
            return OffloadAllocation(handle, look, fut, evicted_hashes, self)

    def _onboard_op(self, ids: list[int], positions: list[int], key: str, ob: Onboarding):
        """An op writing staged onboarded bytes into device blocks ``ids``; marks them verified."""
        storage = self.device.storage
        dims = (*storage.kv.shape[:2], 1, *storage.kv.shape[3:])

        def write_onboarded(staged: dict) -> None:
            data = staged.get(key)
            if data is None:
                return  # the source read failed: these blocks stay unverified
            good = list(range(len(ids)))
            if isinstance(data, list):  # per-block payloads (disk): a failed read is None
                good = [i for i, p in enumerate(data) if p is not None]
                if not good:
                    return
                data = [data[i] for i in good]
            storage.write_blocks(
                [ids[i] for i in good], staged_as_tensor(data, dims, storage.storage_dtype)
            )
            ob.verified.update(positions[i] for i in good)

        return write_onboarded

    def _allocate_plain(
        self, num_tokens: int, request_id: str | None, metadata: dict[str, Any] | None
    ) -> OffloadAllocation:
        """No prefix information: device blocks only (victims still spill down)."""
        with self._call():
            meta = dict(metadata or {})
            if request_id is not None:
                meta["request_id"] = request_id
            self._device_victims.clear()
            handle = self.device.alloc(num_tokens, metadata=meta)
            evicted = [h for _, h in self._device_victims]
            self.num_requests += 1
            self.query_tokens += num_tokens
            ops = Job()
            self._drain_staged(ops)
            look = OffloadLookup(
                0, [], dict.fromkeys(self.tier_names, 0), 0, self.block_size, self.device_name
            )
            result = OnboardResult(
                dict.fromkeys(self.tier_names, 0), dict.fromkeys(self.tier_names, 0), 0, 0.0
            )
            return OffloadAllocation(handle, look, self._submit(ops, result), evicted, self)

    def _tier(self, name: str) -> LowerTier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KVInvalidInputError(f"no tier named {name!r}; tiers are {self.tier_names}")

    def _stats(self, name: str) -> TierStats:
        return self.device_stats if name == self.device_name else self._tier(name).stats

    def _count_hit(self, h: Hashable) -> None:
        if self.admit_after_hits:
            self._hits[h] = self._hits.get(h, 0) + 1

    def _admitted(self, hashes: list[Hashable]) -> list[int]:
        """Indices of the hashes allowed into a lower tier."""
        n = self.admit_after_hits
        if not n:
            return list(range(len(hashes)))
        hits = self._hits
        return [i for i, h in enumerate(hashes) if hits.get(h, 0) >= n]

    def _forget(self, hashes: Sequence[Hashable]) -> None:
        """Drop hit counts of blocks no tier holds any more."""
        if not self.admit_after_hits:
            return
        dev_cached = self.device.block_pool.cached
        for h in hashes:
            if h not in dev_cached and not any(h in t for t in self.tiers):
                self._hits.pop(h, None)

    def _spill(
        self, hashes: list[Hashable], key: str | None, ops: list, *, from_device: bool
    ) -> int:
        """Write-back of blocks leaving the device down the chain; returns blocks written below."""
        if from_device:
            self.device_stats.blocks_out += len(hashes)
            self.device_stats.bytes_out += len(hashes) * self.block_nbytes
        spilled = 0
        stats = self.device_stats
        for i, tier in enumerate(self.tiers):
            if not hashes:
                return spilled
            keep = self._admitted(hashes)
            if len(keep) != len(hashes):
                kept = set(keep)
                dropped = [hashes[j] for j in range(len(hashes)) if j not in kept]
                stats.dropped_blocks += len(dropped)
                self._forget(dropped)
                sub = f"{key}|admitted"
                if key is not None and self.has_data:
                    ops.append(_select_op(key, sub, keep))
                hashes = [hashes[j] for j in keep]
                key = sub
            if not hashes:
                return spilled
            spilled += len(hashes)
            has_below = i + 1 < len(self.tiers)
            hashes, key = tier.insert(
                hashes,
                key if self.has_data else None,
                ops,
                keep_victim_bytes=has_below and self.has_data,
            )
            stats = tier.stats
        if hashes:
            stats.dropped_blocks += len(hashes)
            self._forget(hashes)
        return spilled

    def _write_down(self, pairs: list[tuple[int, Hashable]], ops: list) -> None:
        """Write-through: copy device blocks into every lower tier (inclusive)."""
        pairs = [(b, h) for b, h in pairs if self.device.block_pool.cached.get(h) == b]
        if not pairs or not self.tiers:
            return
        ids = [b for b, _ in pairs]
        hashes = [h for _, h in pairs]
        key = None
        if self.has_data:
            self._job_seq += 1
            key = f"wt{self._job_seq}"
            storage = self.device.storage
            ops.append(
                lambda staged, ids=ids, key=key: staged.__setitem__(key, storage.read_blocks(ids))
            )
        self.device_stats.blocks_out += len(ids)
        self.device_stats.bytes_out += len(ids) * self.block_nbytes
        for i, tier in enumerate(self.tiers):
            has_below = i + 1 < len(self.tiers)
            victims, vkey = tier.insert(
                hashes, key, ops, keep_victim_bytes=has_below and self.has_data
            )
            if victims:
                # a lower copy made room: the victims continue down as write-back
                rest = self.tiers[i + 1 :]
                if rest:
                    self._spill_from(i + 1, victims, vkey, ops)
                else:
                    tier.stats.dropped_blocks += len(victims)
                    self._forget(victims)

    def _spill_from(self, start: int, hashes: list, key: str | None, ops: list) -> None:
        saved, self.tiers = self.tiers, self.tiers[start:]
        try:
            self._spill(hashes, key, ops, from_device=False)
        finally:
            self.tiers = saved

    def _drain_staged(self, ops: list) -> None:
        """Process evictions / new cached blocks recorded by the device hook."""
        if self._device_victims:
            victims = list(self._device_victims)
            self._device_victims.clear()
            self.device_stats.evicted_blocks += len(victims)
            key = None
            if self.has_data:
                self._job_seq += 1
                key = f"ev{self._job_seq}"
                ids = [b for b, _ in victims]
                storage = self.device.storage
                ops.append(
                    lambda staged, ids=ids, key=key: staged.__setitem__(
                        key, storage.read_blocks(ids)
                    )
                )
            self._spill([h for _, h in victims], key, ops, from_device=True)
        if self._newly_cached:
            pairs = list(self._newly_cached)
            self._newly_cached.clear()
            if self._exclusive:
                for tier in self.tiers:
                    present = [h for _, h in pairs if h in tier]
                    if present:
                        tier.remove(present, ops)
            elif not self.admit_after_hits:
                self._write_down(pairs, ops)

    # -- the rest of a request's life ----------------------------------------
    def cache_blocks(self, handle: KVHandle, **kwargs: Any) -> int:
        """``KVPool.cache_blocks`` (write-through copies the new blocks down).

        Waits for the handle's own onboarding first: only its verified prefix
        counts as cached, the rest must have been computed.
        """
        with self._call():
            self._await_onboarding(handle)
            n = self.device.cache_blocks(handle, **kwargs)
            ops = Job()
            self._drain_staged(ops)
            self._submit(ops, OnboardResult({}, {}, 0, 0.0))
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
            ops = Job()
            self._drain_staged(ops)
            return self._submit(ops, OnboardResult({}, {}, 0, 0.0))

    def invalidate(self, block_hashes: Sequence[Hashable]) -> int:
        """Drop these hashes from every tier (stale KV). Returns blocks dropped."""
        with self._call():
            self._suppress_evict_hook = True
            try:
                n = self.device.invalidate(block_hashes)
            finally:
                self._suppress_evict_hook = False
            for tier in self.tiers:
                present = [h for h in block_hashes if h in tier]
                if present:
                    ops = Job()
                    tier.remove(present, ops)
                    self._run_inline(ops)
                    n += len(present)
            for h in block_hashes:
                self._hits.pop(h, None)
            return n

    def read_block(self, block_hash: Hashable):
        """The bytes of a cached block from the first tier holding it (tests, debugging).

        Returns ``(tier name, tensor [L, 2, 1, <block dims>])``.

        Raises:
            KVCacheMissError: no tier holds it.
        """
        from ..errors import KVCacheMissError

        _check_hashable(block_hash)
        with self._lock:
            self.wait_all()
            self._queue.settle(self._apply)
            if not self.has_data:
                raise KVConfigError("this manager is metadata-only")
            storage = self.device.storage
            dims = (*storage.kv.shape[:2], 1, *storage.kv.shape[3:])
            b = self.device.block_pool.cached.get(block_hash)
            if b is not None:
                return self.device_name, storage.read_blocks([b])
            for tier in self.tiers:
                if block_hash in tier:
                    staged: dict = {}
                    tier.read_op([block_hash], "x")(staged)
                    tier.stats.blocks_out -= 1  # a debugging read is not traffic
                    tier.stats.bytes_out -= self.block_nbytes
                    return tier.name, staged_as_tensor(staged["x"], dims, storage.storage_dtype)
            raise KVCacheMissError(f"no tier holds block {block_hash!r}")

    def where(self, block_hash: Hashable) -> list[str]:
        """Names of the tiers holding ``block_hash`` (top down)."""
        _check_hashable(block_hash)
        with self._lock:
            self._queue.settle(self._apply)
            out = [self.device_name] if block_hash in self.device.block_pool.cached else []
            return out + [t.name for t in self.tiers if block_hash in t]

    # -- stats and lifecycle -------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        """Per-tier counters and hit ratios (block and token)."""
        with self._lock:
            self._queue.settle(self._apply)
            tiers = {}
            qb = self.query_blocks
            for name in self.tier_names:
                s = self._stats(name).to_dict()
                pool = self.device.block_pool if name == self.device_name else self._tier(name).pool
                s["resident_blocks"] = pool.num_cached
                s["used_blocks"] = pool.num_used
                s["block_hit_ratio"] = s["hit_blocks"] / qb if qb else 0.0
                s["hit_tokens"] = s["hit_blocks"] * self.block_size
                s["token_hit_ratio"] = (
                    s["hit_tokens"] / self.query_tokens if self.query_tokens else 0.0
                )
                tiers[name] = s
            hit_blocks = sum(s["hit_blocks"] for s in tiers.values())
            return {
                "tiers": tiers,
                "requests": self.num_requests,
                "query_blocks": qb,
                "query_tokens": self.query_tokens,
                "hit_blocks": hit_blocks,
                "block_hit_ratio": hit_blocks / qb if qb else 0.0,
                "token_hit_ratio": hit_blocks * self.block_size / self.query_tokens
                if self.query_tokens
                else 0.0,
                "request_hit_ratio": self.num_hit_requests / self.num_requests
                if self.num_requests
                else 0.0,
                "write_policy": self.write_policy,
                "admit_after_hits": self.admit_after_hits,
                "promote_on_hit": self.promote_on_hit,
            }

    def reset(self) -> None:
        """Free every handle, empty every tier (disk files included), zero counters."""
        with self._call():
            self.wait_all()
            self._queue.clear()  # their handles die with the reset
            self.device.reset()
            for t in self.tiers:
                t.reset()
            self.device_stats = TierStats(self.device_name, self.device.num_blocks)
            self._hits.clear()
            self._device_victims.clear()
            self._newly_cached.clear()
            self._reset_counters()

    def close(self) -> None:
        """Finish queued copies and release the disk directories (files stay)."""
        if self._closed:
            return
        self.wait_all()
        with self._lock:
            self._queue.settle(self._apply)
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
        return self._hits.get(block_hash, 0)

    def check_invariants(self) -> None:
        """Every tier within budget; exclusive chains hold each block once; the
        files of a disk tier are its index (after the queued copies ran and settled)."""
        with self._lock:
            self.wait_all()
            self._queue.settle(self._apply)
            self.device.check_invariants()
            for t in self.tiers:
                t.check_invariants()
                if t.disk is not None:
                    on_disk = set(t.disk.keys())
                    assert on_disk == set(t.pool.cached), f"tier {t.name}: files differ from index"
            if self.promote_on_hit and not self._write_through:
                seen: set = set(self.device.block_pool.cached)
                for t in self.tiers:
                    both = seen & set(t.pool.cached)
                    assert not both, (
                        f"exclusive chain holds {len(both)} blocks twice (tier {t.name})"
                    )
                    seen |= set(t.pool.cached)

    def __repr__(self) -> str:
        caps = ", ".join(
            [f"{self.device_name}={self.device.num_blocks}"]
            + [f"{t.name}={t.num_blocks}" for t in self.tiers]
        )
        return f"KVOffloadManager({caps}, {self.write_policy})"


def _check_hashable(block_hash: Any) -> None:
    try:
        hash(block_hash)
    except TypeError:
        raise KVInvalidTypeError(
            f"a block hash must be hashable, got {type(block_hash).__name__}"
        ) from None
