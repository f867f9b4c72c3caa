"""Copy jobs of the offload manager: what the worker runs and what it reports back.

A manager call plans under the manager's lock and queues one ``CopyPlan``
(``plan.py``): typed steps in the order they must run, plus what running
them teaches. The worker never takes the lock (the lock
holder may be waiting for the worker); what it learns is *settled* under the
lock by the next manager call, by ``OffloadAllocation.wait()`` or by
``check_invariants()``, oldest job first::

    plan (lock)            worker (no lock)                        settle (lock)
    -----------            ----------------                        -------------
    onboard h1 h2 from     read h1 ok, h2 fails (crc, missing,     register h1 on the device
    disk into fresh        EIO): delete h2's file, write h1 into   (verified); drop h2 from
    device blocks          its device block; handle's              the disk index if it is
    (not hittable yet)     num_cached_tokens = up to h1            still that copy
    spill v1 v2 to disk    v1 written, v2: disk full               drop v2 (not stored),
                                                                   count a write error

Failure is per block and never aborts a job: every op runs; an op whose input
is missing (an upstream read failed) treats its blocks as failed. So:

* A block onboarded into the device is registered (hittable) only at settle,
  and only if its bytes were written into its device block and, from disk,
  matched their checksum. Until then it is *in flight*: in no tier's index,
  so a second request for the same prefix misses it and computes it itself
  (its copy is then the cached one; the onboarded block stays unregistered).
  Nobody waits on another request's onboarding, and nothing can hit bytes
  that never arrived.
* A failed onboarding is a miss, not an error: the allocation's future still
  resolves; ``handle.num_cached_tokens`` is lowered (before the future
  resolves) to the verified prefix, the engine computes from there;
  ``OnboardResult.blocks_failed`` / ``errors`` say what failed (typed). The
  bad copy is dropped from its tier (index and file), so the next request
  recomputes instead of failing again.
* A lower-tier write that fails (disk full) means "this block is not stored":
  it is dropped from that tier's index at settle, counted in
  ``TierStats.write_errors``, and no request's future fails for it.
* Drops are by generation: a tier stamps each block it admits, a failure
  names the stamp it saw, and settle drops the block only if the tier still
  holds that same admission (a block evicted and admitted again meanwhile is
  a new copy with its own write queued behind).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..handle import KVHandle
    from .plan import CopyPlan

__all__ = ["CopyQueue", "Onboarding"]

WORKER_PREFIX = "kv-offload"


@dataclass(slots=True)
class Onboarding:
    """Blocks ``first .. num_hit`` of a handle, copied up into its fresh device blocks.

    ``verified`` collects the positions whose bytes landed in their device
    block (set by the worker); ``finish`` turns it into the verified prefix.
    """

    handle: KVHandle
    hashes: list
    first: int
    num_hit: int
    sources: list  # lower tier name of positions first .. num_hit (None: a device copy)
    result: Any  # the OnboardResult the future resolves to
    verified: set = field(default_factory=set)
    num_verified: int = 0

    def finish(self, errors: list[BaseException]) -> None:
        v = self.first
        while v < self.num_hit and v in self.verified:
            v += 1
        self.num_verified = v
        res = self.result
        for p in range(self.first, self.num_hit):
            src = self.sources[p - self.first]
            counts = res.blocks_onboarded if p < v else res.blocks_failed
            if src in counts:
                counts[src] += 1
        res.errors = list(errors)
        # before the future resolves: an engine that waited computes from here
        self.handle.num_cached_tokens = v * self.handle.block_size


class CopyQueue:
    """One worker thread running jobs in order; finished jobs wait to be settled.

    Args:
        async_copies: run jobs in the worker (False: inline, done on return).
    """

    def __init__(self, async_copies: bool) -> None:
        self.async_copies = async_copies
        self._executor: ThreadPoolExecutor | None = None
        self._last: Future | None = None
        self._unsettled: deque[tuple[Future, CopyPlan]] = deque()
        #: handle id -> future of its onboarding (free / cache wait for it)
        self.onboarding: dict[str, Future] = {}

    def submit(self, job: CopyPlan, result: Any, settle: Callable[[CopyPlan], None]) -> Future:
        """Queue ``job``; its future resolves to ``result``. Inline jobs settle at once."""
        f: Future
        if not job and job.onboarding is None and (self._last is None or self._last.done()):
            f = Future()  # nothing to move (metadata-only, or no victims): done now
            f.set_result(result)
            return f
        if not self.async_copies or (
            not job and job.onboarding is None and (self._last is None or self._last.done())
        ):
            if job:
                self.wait_all()
                t0 = time.perf_counter()
                job.run()
                result.elapsed_s = time.perf_counter() - t0
            self.settle(settle)  # older jobs first
            settle(job)
            f = Future()
            f.set_result(result)
            return f
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_PREFIX)

        def work() -> Any:
            t0 = time.perf_counter()
            job.run()
            result.elapsed_s = time.perf_counter() - t0
            return result

        fut = self._executor.submit(work)
        self._last = fut
        self._unsettled.append((fut, job))
        if job.onboarding is not None:
            self.onboarding[job.onboarding.handle.handle_id] = fut
        return fut

    def run_inline(self, job: CopyPlan, settle: Callable[[CopyPlan], None]) -> None:
        """Run ``job`` now, after everything queued, and settle it."""
        if job:
            self.wait_all()
            job.run()
        self.settle(settle)  # older jobs first
        settle(job)

    def settle(self, apply: Callable[[CopyPlan], None]) -> None:
        """Apply finished jobs, oldest first (stops at the first one still running)."""
        q = self._unsettled
        while q and q[0][0].done():
            _, job = q.popleft()
            if job.onboarding is not None:
                self.onboarding.pop(job.onboarding.handle.handle_id, None)
            apply(job)

    def wait_for(self, handle_id: str, timeout: float | None = None) -> None:
        """Block until the onboarding of ``handle_id`` (if any) has run."""
        f = self.onboarding.get(handle_id)
        if f is not None and not _in_worker():
            with contextlib.suppress(CancelledError):
                f.exception(timeout)

    def wait_all(self, timeout: float | None = None) -> None:
        """Block until every queued job has run (errors stay with their futures)."""
        if _in_worker():
            return  # the worker itself: its own queue is behind it
        f = self._last
        if f is not None:
            with contextlib.suppress(CancelledError):
                f.exception(timeout)

    def clear(self) -> None:
        """Forget finished jobs without settling them (the pool was reset)."""
        self._unsettled.clear()
        self.onboarding.clear()

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _in_worker() -> bool:
    return threading.current_thread().name.startswith(WORKER_PREFIX)
