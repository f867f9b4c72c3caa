"""``predictive``: a learned eviction policy on ``HistoricalPredictor`` (lifetime.py).

Each cached block belongs to a *session*: the hash of the first block of its
prefix chain (``on_cached`` passes the parent; a first block starts a new
session). Requests that share a system prompt or a conversation history share
a session. The predictor learns, per session, an EMA of "was the block's next
event a reuse?":

* ``on_hit(b)``: observation *reused* (lifetime: ticks since b's last access);
* ``on_evicted(b)``: observation *not reused* (it left the cache unreused).

When ``b`` becomes evictable (``add``) it is filed under the key
``(L + predicted reuse probability of its session, release tick)`` and the
victim is the smallest key: lowest predicted reuse first, ties (and a cold
predictor, where every session has the same default) least recently released
first, so with no history it is exactly LRU. ``L`` is the key of the last
victim (GreedyDual-style aging, Cao & Irani 1997): without it a block
released with a high probability would outlive every later block forever;
with it, a probability ``p`` buys ``p`` units of ``L`` and then ages out.
The key is frozen at release: what the predictor learns later applies from
the block's next release (every event stays O(log n), a lazy heap).

Time is a logical clock (one tick per cached block, hit and release), so a
replay decides the same victims on every machine. Blocks in use or pinned are
never candidates (the pool only offers evictable blocks).
"""

from __future__ import annotations

from collections.abc import Hashable

from ..lifetime import HistoricalPredictor
from ._lazyheap import LazyHeap
from .base import EvictionPolicy

__all__ = ["PredictivePolicy"]


class PredictivePolicy(EvictionPolicy):
    """Lowest predicted reuse probability first (per-session EMA), ties by LRU.

    Args:
        clock: unused (the policy keeps a logical clock).
        alpha: EMA smoothing of the default predictor.
        predictor: a ``HistoricalPredictor`` to use (and share) instead.
    """

    name = "predictive"
    description = "learned: lowest per-session predicted reuse probability first (EMA), ties LRU"
    tracks_hits = True

    def __init__(
        self, clock=None, alpha: float = 0.1, predictor: HistoricalPredictor | None = None
    ):
        super().__init__(clock)
        self.predictor = predictor or HistoricalPredictor(alpha=alpha, default_lifetime=0.0)
        self._heap = LazyHeap()
        self._evictable = self._heap  # len / in
        self._session: dict[int, Hashable] = {}  # cached block -> session key
        self._last: dict[int, int] = {}  # cached block -> tick of its last access
        self._tick = 0
        self._inflation = 0.0  # L: key of the last victim

    # -- hooks ---------------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        s = self._session.get(parent_block_id, block_hash) if parent_block_id >= 0 else block_hash
        self._session[block_id] = s
        self._tick += 1
        self._last[block_id] = self._tick

    def on_hit(self, block_id: int) -> None:
        s = self._session.get(block_id)
        self._tick += 1
        if s is not None:
            self.predictor.observe(s, True, self._tick - self._last[block_id])
            self._last[block_id] = self._tick

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        s = self._session.pop(block_id, None)
        last = self._last.pop(block_id, self._tick)
        if s is not None:
            self.predictor.observe(s, False, self._tick - last)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._session.pop(block_id, None)
        self._last.pop(block_id, None)
        self._heap.discard(block_id)

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        self._tick += 1
        s = self._session.get(block_id)
        p = self.predictor.reuse_probability(s) if s is not None else 0.0
        self._heap.push(block_id, self._inflation + p, self._tick)

    def remove(self, block_id: int) -> None:
        if not self._heap.discard(block_id):
            raise KeyError(block_id)

    def pop_victim(self) -> int:
        top = self._heap.top_key()
        if top is None:
            raise self._no_victim()
        self._inflation = top[0]
        return self._heap.pop()

    def peek_victims(self, n: int) -> list[int]:
        return self._heap.peek(n)

    def reset(self) -> None:
        self._heap.clear()
        self._session.clear()
        self._last.clear()
        self._tick = 0
        self._inflation = 0.0
        self.predictor.reset()
