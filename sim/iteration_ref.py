"""The iteration-level engine as a plain per-step loop: one instance, vLLM v1's scheduler.

Where the request-level engine (``sim.core``) gives each request a prefill and a
decode duration of its own, this one runs *steps*: each step schedules a batch,
the cost model (``sim.cost``) times it from the batch's new tokens and context
lengths, and every sequence that caught up with its tokens samples one token at
the step's end. Requests therefore contend for the GPU: a prefill that shares a
step with decodes slows them down, and a queue lengthens TTFT.

The scheduling rules follow ``vllm/v1/core/sched/scheduler.py`` (``Scheduler.schedule``
and ``update_from_output``; read at commit 00024d3 of vllm-project/vllm and checked
against the ``vllm==0.11.0`` wheel by ``benchmarks/compare_vllm_scheduler.py``):

1. Running requests first, in the running list's order. Each asks for
   ``num_tokens - num_computed_tokens`` new tokens (one for a decode, the rest of
   its prompt for a chunked prefill), capped by the step's remaining token budget
   (``max_num_batched_tokens``), and the blocks to hold them.
2. When the pool cannot give those blocks, the *last* request of the running list
   is preempted (``self.running.pop()``: the most recently admitted), its blocks
   freed, its computed tokens reset to zero (recompute) and it goes back to the
   *front* of the waiting queue (``prepend_request``); repeat until the request
   fits or it preempted itself.
3. Waiting requests (FCFS) are admitted only when nothing was preempted this step
   (``if not preempted_reqs``), while the running list is shorter than
   ``max_num_seqs`` and budget remains. A request's cached prefix is looked up
   first, capped at ``num_tokens - 1`` tokens (the last-token rule: the last token
   is always computed, so a fully cached prompt still has one token of work; the
   cap works in whole blocks, so a block-aligned fully cached prompt recomputes its
   last block). Without chunked prefill, a request whose new tokens exceed the
   remaining budget is skipped and later ones are tried (vLLM 0.11's
   ``skipped_waiting_requests``; the skipped go back to the head of the queue, the
   last skipped first, as its ``prepend_requests`` leaves them); with it, its first
   chunk takes what is left. When its blocks do not fit, admission stops
   (head-of-line).
4. Blocks become hittable *when scheduled*: at schedule time the request's full
   blocks up to ``num_computed_tokens + num_new_tokens`` are cached under their
   hashes (vLLM's ``allocate_slots`` calls ``cache_blocks`` before the step runs,
   which is safe because every layer writes the batch's KV before attention reads
   it). They are cached as soon as the request is given its slots, so a request
   looked up later in the same step can already hit them, as in vLLM.
5. After the step: each scheduled request adds its new tokens to its computed
   tokens; one that reached ``num_tokens`` samples a token (a prefill chunk that
   ends mid-prompt samples nothing). A request finishes when it has
   ``output_length`` tokens (an output length of 0 is run as 1: the prefill samples
   one) and frees its blocks tail-first.

6. Freed blocks join *one* queue in the order they are freed, cached or not, and
   new blocks come from its front (vLLM's ``FreeKVCacheBlockQueue``: ``free`` appends
   a request's blocks tail-first, ``get_new_blocks`` pops the front and evicts the
   block's hash if it has one). The library's ``BlockPool`` keeps uncached free
   blocks apart and hands them out before evicting anything, so the engine gives a
   block that is freed without a hash (a partial last block, a duplicate) a
   placeholder hash of its own (``("loose", k)``, never looked up) just before
   releasing it: it then waits in the policy's order with the cached ones, as in
   vLLM. Placeholder evictions are not counted as evictions (``evictions``,
   ``evicted``). With the ``lru`` policy this is vLLM's queue exactly.

Blocks: a request holds ``ceil(tokens_with_kv / block_size)`` blocks from the
library's ``BlockPool`` (``match_prefix``, ``touch``, ``allocate``, ``cache_blocks``,
``release``); they grow by one when decoding crosses a block boundary. Prompt
blocks carry the trace's hashes; blocks holding generated tokens carry hashes of
their own (``("gen", row, index)``) so that a preempted request finds its own
blocks again on resumption, as vLLM's do. A request whose prompt plus output
needs more blocks than the pool holds (or, without chunked prefill, more tokens
than the budget) can never run: it is rejected.

PD decode instances (``kv_ready``): a request whose prompt KV arrives from a prefill
instance starts with its first token sampled (at its arrival) and, at its first
admission, its ``kv_ready`` prompt tokens computed; it still needs blocks for them
(prefix hits in this pool are reused, the rest are filled by the transfer). A preempted
one recomputes locally, as vLLM does.

This module is the plain per-step loop, kept as the reference: ``sim.iteration``'s
``IterationEngine`` is the same engine with lazy decode bookkeeping and must equal it
request for request (tests/test_sim_iteration.py).
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from typing import Any

from sagellm_kv_cache.errors import KVNoVictimError

from .cost.base import BatchStats

__all__ = ["ReferenceIterationEngine"]


class ReferenceIterationEngine:
    """Steps one instance over a trace's columns; ``run()`` fills per-request columns.

    Args:
        cols: the trace's columns ``(hashes, lengths, outputs, arrivals)`` (lists).
        block_pool: a metadata-only ``BlockPool`` (``KVPool(...).block_pool``) on ``clock``.
        clock: the ``SimClock`` the pool's policy reads.
        cost: a ``StepCostModel``.
        max_num_batched_tokens: the step's token budget.
        max_num_seqs: most requests running at once.
        chunked_prefill: split prompts across steps at the budget.
        kv_ready: per request, prompt tokens whose KV arrives with it (PD decode
            instances; module doc), or None.
    """

    def __init__(
        self,
        cols: tuple[list, list, list, list],
        block_pool: Any,
        clock: Any,
        cost: Any,
        *,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        chunked_prefill: bool = True,
        progress: bool = False,
        kv_ready: list | None = None,
    ) -> None:
        self.hashes_col, lengths, outputs, self.arrivals = cols
        self.lengths = lengths
        self.outputs = [max(1, int(o)) for o in outputs]
        self.bp, self.bs, self.clock, self.cost = block_pool, block_pool.block_size, clock, cost
        self.mbt, self.max_seqs = max_num_batched_tokens, max_num_seqs
        self.chunked, self.progress = chunked_prefill, progress
        n = len(lengths)
        self.n = n
        nan = math.nan
        self.ready = list(kv_ready) if kv_ready is not None else [0] * n
        self.computed = [0] * n
        self.gen = [1 if r else 0 for r in self.ready]
        self.held: list[list[int]] = [[] for _ in range(n)]
        self.ncached = [0] * n
        self.room = [0] * n  # tokens the held blocks take: len(held[i]) * block_size
        self.next_full = [self.bs] * n  # token count at which the next block is full
        self.hs: list[Any] = [None] * n
        self.lost = [0] * n
        self.admitted = [False] * n
        # outputs
        self.full = [x // self.bs for x in lengths]
        self.hit = [0] * n
        self.alloc = [0] * n
        self.evicted = [0] * n
        self.rejected = [False] * n
        self.start_s = [nan] * n
        self.first_token_s = [float(a) if r else nan for a, r in zip(self.arrivals, self.ready)]
        self.finish_s = [nan] * n
        self.last_tok = list(self.first_token_s)
        self.itl_max = [nan] * n
        self.preemptions = [0] * n
        self.recomputed = [0] * n
        self.num_steps = 0
        self.num_preemptions = 0
        self.busy_s = 0.0
        self.timeline: dict[str, array] = {
            "time_s": array("d"),
            "waiting": array("q"),
            "running": array("q"),
            "blocks_in_use": array("q"),
        }
        self.peaks = [0, 0, 0]
        self.loose: set[int] = set()  # blocks waiting under a placeholder hash (rule 6)
        self.num_loose = 0
        self.loose_evictions = 0

    # -- blocks ---------------------------------------------------------------
    def _hashes(self, i: int, upto: int) -> list:
        hs = self.hs[i]
        if hs is None:
            hs = self.hs[i] = list(self.hashes_col[i][: self.full[i]])
        if len(hs) < upto:
            hs.extend(("gen", i, k) for k in range(len(hs), upto))
        return hs

    def _take(self, need: int, protect: list | None = None) -> list | None:
        """``need`` new blocks, or None when the pool cannot give them (nothing changed)."""
        bp = self.bp
        avail = len(bp.free_queue) + len(bp.policy)
        if protect:
            avail -= bp.num_evictable_among(protect)
        if need > avail:
            return None
        if protect:
            bp.touch(protect)
        try:
            got = bp.allocate(need)
        except KVNoVictimError:  # a policy that refuses victims: as good as full
            if protect:
                bp.release(protect)
            return None
        loose = self.loose
        if loose and not loose.isdisjoint(got):
            k = len(loose)
            loose.difference_update(got)
            self.loose_evictions += k - len(loose)
        return got

    @property
    def evictions(self) -> int:
        """Blocks evicted from the prefix cache (placeholder hashes not counted)."""
        return self.bp.num_evictions - self.loose_evictions

    def _release(self, i: int) -> None:
        """Free request ``i``'s blocks into the one queue (module doc, rule 6)."""
        held = self.held[i]
        if not held:
            return
        bp = self.bp
        hashes = bp.block_hashes
        loose = [b for b in held if hashes[b] is None]
        if loose:
            k = self.num_loose
            self.num_loose = k + len(loose)
            if bp.cache_blocks(loose, [("loose", k + j) for j in range(len(loose))]):
                self.loose.update(loose)
        bp.release(held)
        self.held[i] = []

    def _cache(self, i: int, upto_tokens: int) -> None:
        full = upto_tokens // self.bs
        a = self.ncached[i]
        if full > a:
            hs = self._hashes(i, full)
            s = a - 1 if a else 0
            self.bp.cache_blocks(self.held[i][s:full], hs[s:full], a - s)
            self.ncached[i] = full
            self.next_full[i] = (full + 1) * self.bs

    def _preempt(self, i: int, waiting: deque) -> None:
        self._release(i)
        self.ncached[i] = 0
        self.room[i] = 0
        self.next_full[i] = self.bs
        self.lost[i] = self.computed[i]
        self.computed[i] = 0
        self.preemptions[i] += 1
        self.num_preemptions += 1
        waiting.appendleft(i)

    # -- one step -------------------------------------------------------------
    def _grant(self, i: int, budget: int, running: list, waiting: deque) -> tuple | None:
        """Rule 1-2 for running request ``i``: ``(new, context)`` with its blocks taken
        (preempting from the running list's tail), or None when it preempted itself."""
        c = self.computed[i]
        new = self.lengths[i] + self.gen[i] - c
        if new > budget:
            new = budget
        tot = c + new
        if tot > self.room[i]:
            held = self.held[i]
            need = -(-tot // self.bs) - len(held)
            got = self._take(need)
            while got is None:
                v = running.pop()
                self._preempt(v, waiting)
                if v == i:
                    return None
                got = self._take(need)
            held += got
            self.room[i] = len(held) * self.bs
        if tot >= self.next_full[i]:
            self._cache(i, tot)
        return new, c

    def _admit(self, running: list, waiting: deque, budget: int, now: float, push) -> None:
        """Rule 3: admit waiting requests (``push((i, new, context))`` each)."""
        if not waiting:
            return
        skipped: list[int] = []
        bp, bs, held, L, gen = self.bp, self.bs, self.held, self.lengths, self.gen
        while waiting and budget > 0 and len(running) < self.max_seqs:
            i = waiting[0]
            ntok = L[i] + gen[i]
            hit = bp.match_prefix(self._hashes(i, (ntok - 1) // bs)[: (ntok - 1) // bs])
            hit_tok = len(hit) * bs
            c = hit_tok
            if not self.admitted[i] and self.ready[i] > c:
                c = self.ready[i]
            new = ntok - c
            if not self.chunked and new > budget:
                skipped.append(waiting.popleft())
                continue
            if new > budget:
                new = budget
            need = -(-(c + new) // bs) - len(hit)
            before = self.evictions
            got = self._take(need, hit)
            if got is None:
                break
            waiting.popleft()
            held[i] = hit + got
            self.room[i] = len(held[i]) * bs
            self.ncached[i] = len(hit)
            self.next_full[i] = (len(hit) + 1) * bs
            self.computed[i] = c
            if not self.admitted[i]:
                self.admitted[i] = True
                self.hit[i] = len(hit)
                self.alloc[i] = need
                self.evicted[i] = self.evictions - before
                self.start_s[i] = now
            else:
                self.recomputed[i] += max(0, self.lost[i] - hit_tok)
            running.append(i)
            self._on_admit(i)
            push((i, new, c))
            budget -= new
            if c + new >= self.next_full[i]:  # hittable from now on (module doc, 4)
                self._cache(i, c + new)
        # vLLM puts skipped requests back at the head one by one (``prepend_requests``
        # of a queue built with ``prepend_request``): the last skipped ends up first
        waiting.extendleft(skipped)

    def _on_admit(self, i: int) -> None:
        """Hook: ``i`` was appended to the running list."""

    @staticmethod
    def _sums(sched: list) -> tuple[int, int, float, int]:
        """(tokens, decodes, query-key pairs, KV tokens) of ``[(i, new, context)]``."""
        T = D = R = A = 0
        for _, new, c in sched:
            T += new
            R += c + new
            if new == 1 and c:
                D += 1
                A += c + 1
            else:
                A += new * c + new * (new + 1) // 2
        return T, D, float(A), R

    def _schedule(self, running: list, waiting: deque, now: float) -> tuple:
        """vLLM v1's ``schedule()``: (scheduled [(i, new, ctx)], its ``BatchStats``,
        preempted). Each request's full blocks are cached as soon as it is given its
        slots, so a request looked up later in the same step can hit them (vLLM's
        ``allocate_slots`` caches before the next request is considered)."""
        budget = self.mbt
        sched: list[tuple[int, int, int]] = []
        preempted = False
        idx = 0
        while idx < len(running) and budget > 0:
            n0 = self.num_preemptions
            g = self._grant(running[idx], budget, running, waiting)
            preempted = preempted or self.num_preemptions > n0
            if g is None:
                break
            sched.append((running[idx], *g))
            budget -= g[0]
            idx += 1
        if not preempted:
            self._admit(running, waiting, budget, now, sched.append)
        T, D, A, R = self._sums(sched)
        return sched, BatchStats(T, len(sched), D, A, R), preempted

    def _finish_step(self, sched: list, end: float) -> list:
        """vLLM v1's ``update_from_output``: tokens sampled at ``end``; the finished rows."""
        L, gen, computed, out = self.lengths, self.gen, self.computed, self.outputs
        last_tok, itl = self.last_tok, self.itl_max
        done = []
        for i, new, c in sched:
            c += new
            computed[i] = c
            g = gen[i]
            if c == L[i] + g:
                g += 1
                gen[i] = g
                if g == 1:
                    self.first_token_s[i] = end
                else:
                    gap = end - last_tok[i]
                    if not gap <= itl[i]:  # NaN-safe max
                        itl[i] = gap
                last_tok[i] = end
                if g >= out[i]:
                    self.finish_s[i] = end
                    self._release(i)
                    self.room[i] = 0
                    done.append(i)
        return done

    # -- the loop -------------------------------------------------------------
    def run(self) -> ReferenceIterationEngine:
        bs, L, out, arrivals = self.bs, self.lengths, self.outputs, self.arrivals
        cap = self.bp.num_blocks
        clock = self.clock
        cost_time = self.cost.time
        n = self.n
        order = sorted(range(n), key=arrivals.__getitem__)
        waiting: deque[int] = deque()
        running: list[int] = []
        tl = self.timeline
        tl_t, tl_w, tl_r, tl_u = tl["time_s"], tl["waiting"], tl["running"], tl["blocks_in_use"]
        peaks = self.peaks
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc="iteration replay", unit="req")
        p = 0
        now = 0.0
        while p < n or waiting or running:
            if not waiting and not running:
                now = max(now, arrivals[order[p]])
            while p < n and arrivals[order[p]] <= now:
                i = order[p]
                p += 1
                tokens_with_kv = L[i] + out[i] - 1
                if -(-tokens_with_kv // bs) > cap or (
                    not self.chunked and tokens_with_kv > self.mbt
                ):
                    self.rejected[i] = True
                    self.on_done(i)
                    if bar is not None:
                        bar.update(1)
                else:
                    waiting.append(i)
            if not waiting and not running:
                continue
            clock.now = now
            sched, st, preempted = self._schedule(running, waiting, now)
            if not st.num_seqs:
                if not running and waiting and not preempted:
                    raise AssertionError(f"request {waiting[0]} cannot start in an idle pool")
                continue
            d = cost_time(st)
            end = now + d
            self.busy_s += d
            self.num_steps += 1
            done = self._finish_step(sched, end)
            if done:
                ds = set(done)
                running[:] = [r for r in running if r not in ds]
                for i in done:
                    self.on_done(i)
                if bar is not None:
                    bar.update(len(done))
            now = end
            used = self.bp.num_used
            if used > peaks[0]:
                peaks[0] = used
            if len(running) > peaks[1]:
                peaks[1] = len(running)
            if len(waiting) > peaks[2]:
                peaks[2] = len(waiting)
            tl_t.append(now)
            tl_w.append(len(waiting))
            tl_r.append(len(running))
            tl_u.append(used)
        if bar is not None:
            bar.close()
        return self

    def on_done(self, i: int) -> None:
        """Hook: request ``i`` finished (or was rejected)."""
