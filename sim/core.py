"""The event engine: one loop under every replay mode.

Small on purpose (after Vidur's ``simulator.py``): pop the earliest event,
handle it, push its follow-ups. The entities are the requests (rows of the
trace table, kept as columns) and the *instances* whose caches are the library
itself (``sim.instances``: ``PoolInstance``, a metadata-only ``KVPool``, or
``TieredInstance``, a ``KVOffloadManager``, device tier first); one instance,
or N behind a router (a fleet, ``sim.fleet``). One request's life::

    arrival ──> waiting (FIFO) ──admit──> prefill ──────────> decode ──────────> finish
       t_a         queue_s        t_s      prefill_s            decode_s            t_f
                                       │                    │                   │
                         leading cached run taken,     its full blocks      its blocks
                         the rest allocated (the       cached (hittable     released
                         policy evicts)                from now on)         tail-first

Admission asks the pool (``KVPool.peek_admission``: the rule
``alloc_with_prefix`` applies, written once) whether the head of the queue can
have its blocks now; ``max_num_seqs`` caps the requests running at once.

Modes are configurations of the same loop:

* ``sequential``: zero time, one request at a time in trace order (the setting
  of published hit ratios). Every follow-up event of a request is due at its
  arrival time and, by the tie order below, runs before the next arrival, so
  the loop runs them inline (no heap) - the same order, just faster. Timing
  columns are then each request's cost *alone* (no queueing);
* ``concurrent``: arrivals on the simulated clock, durations from the cost
  model; requests overlap, hold their blocks and queue.

Events at equal times run finishes first, then prefill ends, then arrivals
(each kind in the order scheduled): with a zero cost model the concurrent mode
therefore equals the sequential one request for request.

Semantics shared by every mode: a request's blocks are its *full* blocks
(``input_length // block_size`` leading hash ids); the partial tail block is
recomputed and takes no capacity; a request with more full blocks than the
device holds can never run: it is *rejected* (counted, a miss, never queued).

Metrics go through hooks: any object with some of ``on_arrival(i, now)``,
``on_start(i, now)``, ``on_prefill_end(i, now)``, ``on_finish(i, now)``,
``on_reject(i, now)`` is called at those points (``i`` is the trace row).
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import deque
from typing import Any

from .instances import SimClock

__all__ = ["Engine"]

_FINISH, _PREFILL_END, _ARRIVAL = 0, 1, 2
_HOOKS = ("on_arrival", "on_start", "on_prefill_end", "on_finish", "on_reject")


class Engine:
    """The loop. ``run()`` fills per-request columns on ``self`` and on the instances.

    Args:
        hashes_col, lengths, outputs, arrivals: the trace's columns (lists).
        instance: a ``PoolInstance`` or ``TieredInstance`` built on ``clock``, or a
            list of them (a fleet: then a ``router`` places each request).
        clock: the ``SimClock`` the instances' pools read.
        sequential: zero time, one request at a time (see the module docstring).
        max_num_seqs: most requests running at once, per instance (None: only the
            cache limits).
        hooks: metric hooks (see the module docstring).
        progress: a tqdm bar over finished requests.
        router: None (every request on instance 0), or an object with
            ``route(i, hashes) -> k`` (called at each arrival, rejected requests
            too), and optionally ``starting(i, k, hashes)`` (before instance ``k``
            tries to start ``i``: its caches are as they were before any
            eviction the start makes) and ``update(k, running, waiting, used)``
            (clocked mode: instance ``k``'s state after each event on it).

    An event changes only its own instance, and only that instance is offered
    admission: with round-robin over N instances and zero cost the run equals
    replaying each instance's subsequence alone, request for request.
    """

    def __init__(
        self,
        hashes_col: list,
        lengths: list,
        outputs: list,
        arrivals: list,
        instance: Any,
        clock: SimClock,
        *,
        sequential: bool,
        max_num_seqs: int | None = None,
        hooks: tuple = (),
        progress: bool = False,
        desc: str = "replay",
        router: Any = None,
    ) -> None:
        self.hashes_col, self.lengths, self.outputs, self.arrivals = (
            hashes_col,
            lengths,
            outputs,
            arrivals,
        )
        insts = list(instance) if isinstance(instance, list | tuple) else [instance]
        self.insts = insts
        self.inst = insts[0]
        self.router = router
        self.tail = hasattr(self.inst, "lengths")  # its partial tail block takes capacity
        if self.tail:
            for inst in insts:
                inst.lengths = lengths
        self.clock = clock
        self.sequential = sequential
        self.max_num_seqs = max_num_seqs
        self.hooks = {k: [getattr(h, k) for h in hooks if hasattr(h, k)] for k in _HOOKS}
        self.progress = progress
        self.desc = desc
        n = len(lengths)
        self.n = n
        nan = math.nan
        nk = len(insts)
        self.inst_of = [0] * n
        self.full = [0] * n
        self.rejected = [False] * n
        self.start_s = [nan] * n
        self.prefill_end_s = [nan] * n
        self.finish_s = [nan] * n
        #: one instance: its state after every event (a fleet records none)
        self.timeline = {
            "time_s": array("d"),
            "waiting": array("q"),
            "running": array("q"),
            "blocks_in_use": array("q"),
        }
        self.peak_used = [0] * nk
        self.peak_running = [0] * nk
        self.peak_waiting = [0] * nk

    @property
    def peaks(self) -> tuple[int, int, int]:
        """Blocks in use, running, waiting: the highest of any instance."""
        return max(self.peak_used), max(self.peak_running), max(self.peak_waiting)

    def _emit(self, kind: str, i: int, now: float) -> None:
        for fn in self.hooks[kind]:
            fn(i, now)

    def run(self) -> Engine:
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.n, desc=self.desc, unit="req")
        if self.sequential:
            self._run_sequential(bar)
        else:
            self._run_clocked(bar)
        if bar is not None:
            bar.close()
        return self

    def _run_sequential(self, bar: Any) -> None:
        """Zero time, trace order: arrival, start, prefill end and finish of each request
        before the next (what the clocked loop does with a zero cost model, inline)."""
        insts = self.insts
        inst = insts[0]
        bs = inst.block_size
        cap = inst.capacity_blocks
        serve = inst.serve  # start, written and finish at once
        serves = [x.serve for x in insts]
        hashes_col, lengths, full_l, rejected, inst_of = (
            self.hashes_col,
            self.lengths,
            self.full,
            self.rejected,
            self.inst_of,
        )
        router = self.router
        route = router.route if router is not None else None
        starting = getattr(router, "starting", None)
        hooked = any(self.hooks.values())
        tail = self.tail
        head = getattr(hashes_col, "head", None) or (lambda i, n: hashes_col[i][:n])
        hs: list = []
        for i in range(self.n):
            full = lengths[i] // bs
            full_l[i] = full
            if route is not None:
                hs = head(i, full) if full else []
                k = route(i, hs)
                inst_of[i] = k
                serve = serves[k]
            if (-(-lengths[i] // bs) if tail else full) > cap:  # never fits: a miss
                rejected[i] = True
            elif full:
                if route is None:
                    hs = head(i, full)
                elif starting is not None:
                    starting(i, k, hs)
                serve(i, hs, full)
            if hooked:
                kinds = ("on_arrival", "on_reject") if rejected[i] else _HOOKS[:4]
                for kind in kinds:
                    self._emit(kind, i, 0.0)
            if bar is not None:
                bar.update(1)

    def _run_clocked(self, bar: Any) -> None:
        insts = self.insts
        bs = insts[0].block_size
        cap = insts[0].capacity_blocks
        clock = self.clock
        hashes_col, lengths, outputs, arrivals = (
            self.hashes_col,
            self.lengths,
            self.outputs,
            self.arrivals,
        )
        full_l, inst_of = self.full, self.inst_of
        start_s, prefill_end_s, finish_s = self.start_s, self.prefill_end_s, self.finish_s
        max_seqs = self.max_num_seqs
        emit = self._emit
        hooked = any(self.hooks.values())
        router = self.router
        route = router.route if router is not None else None
        starting = getattr(router, "starting", None)
        update = getattr(router, "update", None)
        record = len(insts) == 1
        tl = self.timeline
        tl_time, tl_wait, tl_run, tl_used = (
            tl["time_s"],
            tl["waiting"],
            tl["running"],
            tl["blocks_in_use"],
        )
        peak_used, peak_running, peak_waiting = (
            self.peak_used,
            self.peak_running,
            self.peak_waiting,
        )
        tail = self.tail
        n = self.n
        order = sorted(range(n), key=arrivals.__getitem__)  # stable: ties keep trace order
        events: list[tuple[float, int, int, int]] = []  # (time, kind, seq, request)
        waiting: list[deque[int]] = [deque() for _ in insts]
        #: the block ids of requests between arrival and prefill end (read once)
        hs_of: dict[int, list] = {}
        running = [0] * len(insts)
        seq = 0

        def admit(k: int, inst: Any, wq: deque[int], now: float) -> None:
            nonlocal seq
            hit_l = inst.hit
            while wq and (max_seqs is None or running[k] < max_seqs):
                i = wq[0]
                full = full_l[i]
                if full:
                    hs = hs_of[i]
                    if starting is not None:
                        starting(i, k, hs)
                    if not inst.start(i, hs, full, running[k] > 0):
                        break
                wq.popleft()
                running[k] += 1
                start_s[i] = now
                if hooked:
                    emit("on_start", i, now)
                seq += 1
                uncached = lengths[i] - hit_l[i] * bs
                heapq.heappush(events, (now + inst.prefill_s(i, uncached), _PREFILL_END, seq, i))
                used = inst.num_used
                if used > peak_used[k]:
                    peak_used[k] = used
                if running[k] > peak_running[k]:
                    peak_running[k] = running[k]
            if len(wq) > peak_waiting[k]:
                peak_waiting[k] = len(wq)
            if wq and not running[k]:  # the head fits an idle pool: unreachable
                raise AssertionError(f"request {wq[0]} cannot start in an idle pool")

        p = 0
        while p < n or events:
            if events and (p >= n or (events[0][0], events[0][1]) < (arrivals[order[p]], _ARRIVAL)):
                now, kind, _, i = heapq.heappop(events)
                clock.now = now
                k = inst_of[i]
                inst = insts[k]
                if kind == _FINISH:
                    inst.finish(i)
                    running[k] -= 1
                    finish_s[i] = now
                    if hooked:
                        emit("on_finish", i, now)
                    if bar is not None:
                        bar.update(1)
                else:
                    full = full_l[i]
                    if full:
                        inst.written(i, hs_of.pop(i))
                    prefill_end_s[i] = now
                    if hooked:
                        emit("on_prefill_end", i, now)
                    seq += 1
                    heapq.heappush(events, (now + inst.cost.decode_s(outputs[i]), _FINISH, seq, i))
            else:
                i = order[p]
                p += 1
                now = arrivals[i]
                clock.now = now
                full = lengths[i] // bs
                full_l[i] = full
                hs = hashes_col[i][:full] if full else []
                if route is not None:
                    k = route(i, hs)
                    inst_of[i] = k
                else:
                    k = 0
                inst = insts[k]
                if hooked:
                    emit("on_arrival", i, now)
                if (-(-lengths[i] // bs) if tail else full) > cap:
                    self.rejected[i] = True
                    if hooked:
                        emit("on_reject", i, now)
                    if bar is not None:
                        bar.update(1)
                else:
                    waiting[k].append(i)
                    if full:
                        hs_of[i] = hs
            wq = waiting[k]
            if wq:
                admit(k, inst, wq, now)
            if update is not None:
                update(k, running[k], len(wq), inst.num_used)
            if record:
                tl_time.append(now)
                tl_wait.append(len(wq))
                tl_run.append(running[k])
                tl_used.append(inst.num_used)
