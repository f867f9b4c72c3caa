"""``workload-aware``: reuse probability per request category, fitted exponentially.

After Jiahao Wang et al., "KVCache Cache in the Wild: Characterizing and
Optimizing KVCache Cache at a Large Cloud Provider" (USENIX ATC'25, Alibaba
Bailian traces): reuse behaviour is predictable *per workload category*;
within a category the time to the next reuse follows an exponential
distribution, so the policy fits, per category ``c``:

* ``P_c``: the probability that a block's next event is a reuse (EMA of
  hit = 1 / eviction = 0 observations, smoothing ``alpha``);
* ``lambda_c = 1 / mean reuse time``: the exponential's rate, from the idle
  times (release to hit) of the blocks of ``c`` that were reused (EMA).

A block of ``c`` idle for ``t`` ticks is reused with the posterior probability

    p(t) = P_c * exp(-lambda_c * t) / (P_c * exp(-lambda_c * t) + 1 - P_c)

(it is either a block that will be reused, whose reuse time has not come yet,
or one that never will). The victim is the evictable block with the lowest
``p``; ties go to the least recently released. ``p`` falls with ``t``, so
within a category release order is eviction order: the policy keeps one
recency queue per category and compares only the queues' oldest blocks, O(C)
per eviction for C categories (a handful).

Categories: the trace has no request type in the pool's events, so by default
a block's category is its position in its prefix chain, bucketed as in the
paper's observation that earlier blocks of a request are reused more (system
prompt and shared history): depth 0, 1-3, 4-15, 16-63, 64+. Pass
``categorize=`` a function ``(block_hash, depth) -> hashable`` to use real
categories (e.g. looked up from the request's type). Time is a logical clock
(one tick per cached block, hit and release): replays are deterministic.
A cold category (no observation) uses ``prior_reuse`` and ``prior_mean_ticks``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable

from ..errors import KVConfigError
from .base import EvictionPolicy

__all__ = ["WorkloadAwarePolicy", "depth_bucket"]


def depth_bucket(block_hash: Hashable, depth: int) -> int:
    """Default category: 0 for a first block, then 1-3, 4-15, 16-63, 64+ (log4 buckets)."""
    if depth <= 0:
        return 0
    return min(4, 1 + (depth.bit_length() - 1) // 2)


class _Fit:
    __slots__ = ("mean", "n_p", "n_t", "p")

    def __init__(self, p: float, mean: float) -> None:
        self.p, self.mean, self.n_p, self.n_t = p, mean, 0, 0


class WorkloadAwarePolicy(EvictionPolicy):
    """ATC'25 workload-aware eviction: lowest fitted reuse probability first, ties LRU."""

    name = "workload_aware"
    description = "ATC'25 (Bailian): per-category reuse prob, exponential in idle time; ties LRU"
    tracks_hits = True

    def __init__(
        self,
        clock=None,
        categorize: Callable[[Hashable, int], Hashable] = depth_bucket,
        alpha: float = 0.05,
        prior_reuse: float = 0.5,
        prior_mean_ticks: float = 1000.0,
    ) -> None:
        super().__init__(clock)
        if not callable(categorize):
            raise KVConfigError("workload_aware: categorize must be callable")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1:
            raise KVConfigError(f"workload_aware: alpha must be in (0, 1], got {alpha!r}")
        if not isinstance(prior_reuse, int | float) or not 0 < prior_reuse < 1:
            raise KVConfigError(
                f"workload_aware: prior_reuse must be in (0, 1), got {prior_reuse!r}"
            )
        if not isinstance(prior_mean_ticks, int | float) or not 0 < prior_mean_ticks < math.inf:
            raise KVConfigError("workload_aware: prior_mean_ticks must be a positive number")
        self.categorize = categorize
        self.alpha = float(alpha)
        self.prior_reuse = float(prior_reuse)
        self.prior_mean_ticks = float(prior_mean_ticks)
        self._fits: dict[Hashable, _Fit] = {}
        self._queues: dict[
            Hashable, OrderedDict[int, int]
        ] = {}  # category -> block -> release tick
        self._cat: dict[int, Hashable] = {}  # cached block -> category
        self._depth: dict[int, int] = {}
        self._released: dict[int, int] = {}  # block -> release tick not yet followed by a hit
        self._n = 0
        self._tick = 0

    # -- model ---------------------------------------------------------------
    def _fit(self, c: Hashable) -> _Fit:
        f = self._fits.get(c)
        if f is None:
            f = self._fits[c] = _Fit(self.prior_reuse, self.prior_mean_ticks)
        return f

    def _observe(self, c: Hashable, reused: bool, idle: int | None) -> None:
        f = self._fit(c)
        a = 1.0 if f.n_p == 0 else self.alpha
        f.p += a * ((1.0 if reused else 0.0) - f.p)
        f.n_p += 1
        if idle is not None:
            a = 1.0 if f.n_t == 0 else self.alpha
            f.mean += a * (max(idle, 1) - f.mean)
            f.n_t += 1

    def reuse_probability(self, category: Hashable, idle_ticks: float) -> float:
        """The posterior reuse probability of a block of ``category`` idle for ``idle_ticks``."""
        f = self._fits.get(category)
        p, mean = (f.p, f.mean) if f is not None else (self.prior_reuse, self.prior_mean_ticks)
        if p <= 0.0:
            return 0.0
        if p >= 1.0:
            return 1.0
        w = p * math.exp(-idle_ticks / mean)
        return w / (w + 1.0 - p)

    def fits(self) -> dict[Hashable, dict[str, float]]:
        """category -> fitted ``reuse_prob``, ``mean_reuse_ticks``, ``rate`` (for reports)."""
        return {
            c: {"reuse_prob": f.p, "mean_reuse_ticks": f.mean, "rate": 1.0 / f.mean}
            for c, f in self._fits.items()
        }

    # -- hooks ---------------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        d = self._depth.get(parent_block_id, -1) + 1 if parent_block_id >= 0 else 0
        self._depth[block_id] = d
        self._cat[block_id] = self.categorize(block_hash, d)
        self._tick += 1

    def on_hit(self, block_id: int) -> None:
        self._tick += 1
        c = self._cat.get(block_id)
        if c is not None:
            rel = self._released.pop(block_id, None)
            self._observe(c, True, None if rel is None else self._tick - rel)

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        c = self._cat.pop(block_id, None)
        self._depth.pop(block_id, None)
        self._released.pop(block_id, None)
        if c is not None:
            self._observe(c, False, None)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._cat.pop(block_id, None)
        self._depth.pop(block_id, None)
        self._released.pop(block_id, None)

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        self._tick += 1
        c = self._cat.get(block_id)  # None: never cached through on_cached (standalone use)
        q = self._queues.get(c)
        if q is None:
            q = self._queues[c] = OrderedDict()
        q[block_id] = self._tick
        self._released[block_id] = self._tick
        self._n += 1

    def remove(self, block_id: int) -> None:
        del self._queues[self._cat.get(block_id)][block_id]
        self._n -= 1

    def _best(self) -> tuple[Hashable, int] | None:
        best = None
        for c, q in self._queues.items():
            if not q:
                continue
            b, rel = next(iter(q.items()))
            key = (self.reuse_probability(c, self._tick - rel), rel)
            if best is None or key < best[0]:
                best = (key, c, b)
        return None if best is None else (best[1], best[2])

    def pop_victim(self) -> int:
        best = self._best()
        if best is None:
            raise self._no_victim()
        c, b = best
        del self._queues[c][b]
        self._n -= 1
        return b

    def peek_victims(self, n: int) -> list[int]:
        # merge the queues' heads by key without touching them
        iters = {c: iter(q.items()) for c, q in self._queues.items()}
        heads = {}
        for c, it in iters.items():
            nxt = next(it, None)
            if nxt is not None:
                heads[c] = nxt
        out: list[int] = []
        while heads and len(out) < n:
            c = min(
                heads,
                key=lambda k: (self.reuse_probability(k, self._tick - heads[k][1]), heads[k][1]),
            )
            out.append(heads[c][0])
            nxt = next(iters[c], None)
            if nxt is None:
                del heads[c]
            else:
                heads[c] = nxt
        return out

    def __len__(self) -> int:
        return self._n

    def __contains__(self, block_id: object) -> bool:
        if not isinstance(block_id, int):
            return False
        q = self._queues.get(self._cat.get(block_id))
        return q is not None and block_id in q

    def reset(self) -> None:
        self._fits.clear()
        self._queues.clear()
        self._cat.clear()
        self._depth.clear()
        self._released.clear()
        self._n = 0
        self._tick = 0
