"""The iteration-level engine: one instance stepping like vLLM v1's scheduler.

The scheduling rules, blocks and PD decode admission are those of the plain per-step
loop in ``sim.iteration_ref`` (its module doc states them, with the vLLM source they
follow); ``IterationEngine`` is that engine with lazy decode bookkeeping, and equals
it request for request (tests/test_sim_iteration.py checks both on random traces).

Lazy decodes: a running request that just sampled a token and decodes next costs the
step nothing in Python until its next *event*: the step where it needs a new block
(its tokens reach its blocks' room), fills a block (which is then cached), or samples
its last token. Until then it takes one token a step, so it is kept as a base step and
a base context: its context at step ``k`` is ``off + k``, and the step's sums
(``BatchStats``) add ``nlazy`` tokens, sequences and decodes and ``sum(off) + nlazy*(k+1)``
KV tokens and query-key pairs. An event heap says which steps wake which requests;
woken, preempted or finishing requests are *materialized* (tokens and counters caught
up; their ITL max is the range max of the step gaps they sampled at).

A step stays on this path when the lazy decodes all get their token: the token demand
of every running request up to the last lazy one (in running order, which is
admission order) fits the budget. Otherwise every lazy request is materialized and
the reference ``_schedule`` runs the step (a safety net: under vLLM's rules a prompt still
being chunked took the rest of a budget, so it is the last running request and no decode
stands behind it). Step times, token counts and block operations
are the reference's, in the same order, so the results are identical (the query-key
pair sums are whole numbers, exact in any order).
"""

from __future__ import annotations

import heapq
from collections import deque

from .cost.base import BatchStats
from .iteration_ref import ReferenceIterationEngine

__all__ = ["IterationEngine"]

_OUT, _ACTIVE, _LAZY = 0, 1, 2


class IterationEngine(ReferenceIterationEngine):
    """``ReferenceIterationEngine`` with lazy decodes (module doc); same arguments."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        n = self.n
        self.state = [_OUT] * n
        self.seq = [0] * n  # admission number: the running list is sorted by it
        self.k0 = [0] * n  # a lazy request's first lazy step
        self.off = [0] * n  # a lazy request's context at step k is off + k
        self.active: set[int] = set()
        self.nlazy = 0
        self.lazy_off = 0  # sum of off over lazy requests
        self.events: list[tuple[int, int, int]] = []  # (step, request, k0)
        self.lazy_tail: list[tuple[int, int, int]] = []  # (-seq, request, k0): max seq
        self.ends: list[float] = []  # each step's end time
        self.gaps: list[float] = []  # ends[k] - ends[k - 1]
        self._nseq = 0

    # -- lazy bookkeeping -----------------------------------------------------
    def _on_admit(self, i: int) -> None:
        self._nseq += 1
        self.seq[i] = self._nseq
        self.state[i] = _ACTIVE
        self.active.add(i)

    def _wake(self, i: int) -> None:
        """Catch a lazy request up to the current step and make it active."""
        k = self.num_steps
        k0 = self.k0[i]
        d = k - k0
        self.state[i] = _ACTIVE
        self.active.add(i)
        self.nlazy -= 1
        self.lazy_off -= self.off[i]
        if d:
            self.computed[i] += d
            self.gen[i] += d
            m = max(self.gaps[k0:k])
            if not m <= self.itl_max[i]:
                self.itl_max[i] = m
            self.last_tok[i] = self.ends[k - 1]

    def _sleep(self, i: int) -> None:
        """Make a request that just sampled and decodes next lazy until its next event."""
        k = self.num_steps
        c = self.computed[i]
        wait = min(self.room[i] - c, self.next_full[i] - 1 - c, self.outputs[i] - self.gen[i] - 1)
        if wait <= 0:
            return
        self.active.discard(i)
        self.state[i] = _LAZY
        self.k0[i] = k
        self.off[i] = c - k
        self.nlazy += 1
        self.lazy_off += c - k
        heapq.heappush(self.events, (k + wait, i, k))
        heapq.heappush(self.lazy_tail, (-self.seq[i], i, k))

    def _is_lazy(self, i: int, k0: int) -> bool:
        return self.state[i] == _LAZY and self.k0[i] == k0

    def _preempt(self, i: int, waiting: deque) -> None:
        if self.state[i] == _LAZY:
            self._wake(i)
        self.state[i] = _OUT
        self.active.discard(i)
        super()._preempt(i, waiting)

    # -- one step -------------------------------------------------------------
    def _schedule(self, running: list, waiting: deque, now: float) -> tuple:
        k = self.num_steps
        ev = self.events
        while ev and ev[0][0] <= k:
            _, i, k0 = heapq.heappop(ev)
            if self._is_lazy(i, k0):
                self._wake(i)
        seq, L, gen, computed = self.seq, self.lengths, self.gen, self.computed
        act = sorted(self.active, key=seq.__getitem__) if len(self.active) > 1 else [*self.active]
        last = 0  # seq of the last lazy request in running order
        if self.nlazy:
            tail = self.lazy_tail
            while not self._is_lazy(tail[0][1], tail[0][2]):
                heapq.heappop(tail)
            last = -tail[0][0]
            demand = self.nlazy
            for i in act:
                if seq[i] > last:
                    break
                demand += L[i] + gen[i] - computed[i]
            if demand > self.mbt:  # a lazy decode would lose its token: step plainly
                for i in running:
                    if self.state[i] == _LAZY:
                        self._wake(i)
                self.lazy_tail.clear()
                return super()._schedule(running, waiting, now)
        mbt = self.mbt
        used = 0
        sched: list[tuple[int, int, int]] = []
        preempted = False
        for i in act:
            if self.state[i] != _ACTIVE:  # preempted earlier in this step
                continue
            budget = mbt - used - (self.nlazy if seq[i] > last else 0)
            if budget <= 0:
                break
            n0 = self.num_preemptions
            g = self._grant(i, budget, running, waiting)
            preempted = preempted or self.num_preemptions > n0
            if g is None:
                break
            sched.append((i, *g))
            used += g[0]
        nl = self.nlazy
        if not preempted:
            self._admit(running, waiting, mbt - used - nl, now, sched.append)
        T, D, A, R = self._sums(sched)
        if nl:
            kv = self.lazy_off + nl * (k + 1)
            T += nl
            D += nl
            A += kv
            R += kv
        return sched, BatchStats(T, len(sched) + nl, D, A, R), preempted

    def _finish_step(self, sched: list, end: float) -> list:
        ends = self.ends
        self.gaps.append(end - ends[-1] if ends else 0.0)
        ends.append(end)
        done = super()._finish_step(sched, end)
        for i in done:
            self.state[i] = _OUT
            self.active.discard(i)
        L, gen, computed, state, last = (
            self.lengths,
            self.gen,
            self.computed,
            self.state,
            self.last_tok,
        )
        for i, _, _ in sched:
            # sampled at this step (so its next gap is a step's) and decodes next
            if state[i] == _ACTIVE and last[i] == end and computed[i] == L[i] + gen[i] - 1:
                self._sleep(i)
        return done
