"""S3-FIFO: a small FIFO, a main FIFO with 2-bit frequencies and a ghost FIFO of hashes.

Definition: Juncheng Yang, Yazhuo Zhang, Ziyue Qiu, Yao Yue, Rashmi Vinayak,
"FIFO queues are all you need for cache eviction", SOSP 2023 (Algorithm 1),
with the defaults of its reference implementation (libCacheSim ``S3FIFO``:
small queue 10% of the cache, ghost as large as the main queue, move to main
on one access).

The modelled cache is every cached block (in use or evictable)::

    on_cached(b, h)   h in G ? (drop h from G, b -> head of M) : b -> head of S;  freq 0
    on_hit(b)         freq = min(freq + 1, 3)               (queue positions unchanged)
    pop_victim()      loop:
                        if S holds >= small_capacity blocks (or M has no candidate):
                          t = tail candidate of S
                          freq > 0  -> t moves to the head of M with freq 0; loop
                          else      -> evict t; its hash enters G (G keeps main_capacity hashes)
                        else:
                          t = tail candidate of M
                          freq > 0  -> t goes back to the head of M with freq - 1; loop
                          else      -> evict t

``small_capacity = max(1, int(small_ratio * capacity))`` and ``main_capacity =
max(1, capacity - small_capacity)``. The pool, not the policy, decides when to
evict, so "S is full" is read as "S holds at least ``small_capacity`` blocks",
and M's size is bounded by the pool (no separate "M is full" step). For an
unbounded standalone cache (capacity None) the capacity is the largest number
of blocks ever cached at once.

Queue order is caching order (``on_cached``), as in this package's FIFO: a
request's blocks are cached prefix first, so within one request the prefix is
older than its suffix (wrap in ``leaf:`` to never evict a prefix before its
cached suffix).

Blocks in use: a block keeps its queue and its position while in use (a hit
only raises its frequency, as in the paper) and is simply not a *candidate*:
each step above looks at the oldest **evictable** block of a queue; in-use
blocks are passed over in place, and queue sizes count them. If S is due but
has no evictable block, M gives the victim, and the other way round.

Implementation: a global insertion counter gives each queue position a
sequence number; each queue keeps a heap of the sequence numbers of its
evictable members (stale entries, left by blocks that went into use or moved,
are dropped lazily when they reach the top). Every event is amortised
O(log n); a block whose heap entry is still live when it is released again is
not pushed twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from heapq import heappush
from typing import Any

from ..errors import KVConfigError
from ._queueviews import Heaps, HeapWalks, Overlay
from .base import EvictionPolicy

__all__ = ["S3FIFOPolicy"]

_NONE, _SMALL, _MAIN = 0, 1, 2
_MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (SOSP'23) over block ids; ghost entries are block hashes.

    Args:
        clock: unused (kept for the common constructor).
        small_ratio: S's share of the capacity (paper: 0.1).
    """

    name = "s3fifo"
    _n_small: int  # blocks in S (in use or evictable)
    _n_main: int
    _n_ev: int  # evictable blocks
    _next_seq: int
    description = "S3-FIFO (SOSP'23): small FIFO 10%, main FIFO with 2-bit freq, ghost of hashes"
    tracks_hits = True

    def __init__(self, clock=None, small_ratio: float = 0.1) -> None:
        super().__init__(clock)
        if not 0.0 < small_ratio < 1.0:
            raise KVConfigError(f"s3fifo: small_ratio must be in (0, 1), got {small_ratio!r}")
        self.small_ratio = small_ratio
        self._max_cached = 0
        self.reset()

    # -- sizes ---------------------------------------------------------------
    def _resize(self) -> None:
        c = self.capacity
        if c is None:
            c = max(1, self._max_cached)
        self.small_capacity = max(1, int(self.small_ratio * c))  # S's size target in blocks
        self.main_capacity = max(1, c - self.small_capacity)  # M's size and G's length

    def set_capacity(self, num_blocks: int | None) -> None:
        super().set_capacity(num_blocks)
        self._resize()
        if num_blocks:
            self._grow(num_blocks - 1)

    def _grow(self, b: int) -> None:
        n = max(b + 1, 2 * len(self._queue), 16) - len(self._queue)
        self._queue += [_NONE] * n
        self._seq += [-1] * n
        self._freq += [0] * n
        self._ev += [False] * n
        self._hash += [None] * n

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        self.add_many((block_id,))

    def add_many(self, block_ids: Iterable[int]) -> None:
        ev, seq, queue, slot = self._ev, self._seq, self._queue, self._slot
        hs, hm = self._heap_s, self._heap_m
        n = 0
        for b in block_ids:
            ev[b] = True
            n += 1
            s = seq[b]
            if s not in slot:
                slot[s] = b
                heappush(hs if queue[b] == _SMALL else hm, s)
        self._n_ev += n

    def remove(self, block_id: int) -> None:
        self.remove_many((block_id,))

    def remove_many(self, block_ids: Iterable[int]) -> None:
        # lazy: the heap entries stay and are skipped (or reused on the next release)
        ev = self._ev
        n = 0
        for b in block_ids:
            ev[b] = False
            n += 1
        self._n_ev -= n

    def pop_victims(self, n: int) -> list[int]:
        if n > self._n_ev:
            raise self._no_victim()
        return self.pop_cascade(n, None)

    def pop_victim(self) -> int:
        return self.pop_victims(1)[0]

    def pop_cascade(self, n: int, after: Callable[[int], int] | None) -> list[int]:
        heaps = Heaps(self._heap_s, self._heap_m, self._slot, self._ev, self._seq)
        k = self._n_small, self._n_main, self._next_seq
        out, added, k = self._select(n, after, heaps, self._seq, self._freq, self._queue, k)
        self._n_small, self._n_main, self._next_seq = k
        self._n_ev += added - len(out)
        return out

    def peek_victims(self, n: int) -> list[int]:
        return self.peek_cascade(n, None)

    def peek_cascade(self, n: int, after: Callable[[int], int] | None) -> list[int]:
        """The victims ``pop_cascade`` would give, found by running the same steps over
        copy-on-write views of the queues (nothing here changes): O((n + m) log size)
        for the m blocks the steps move between queues on the way."""
        seq, freq, queue = Overlay(self._seq), Overlay(self._freq), Overlay(self._queue)
        heaps = HeapWalks(self._heap_s, self._heap_m, self._slot, Overlay(self._ev), seq)
        k = self._n_small, self._n_main, self._next_seq
        return self._select(n, after, heaps, seq, freq, queue, k, real=False)[0]

    def _select(
        self,
        n: int,
        after: Callable[[int], int] | None,
        heaps: Heaps,
        seq: Any,
        freq: Any,
        queue: Any,
        counts: tuple[int, int, int],
        real: bool = True,
    ) -> tuple[list[int], int, tuple[int, int, int]]:
        """The victim loop of the docstring, on the real queues or on views of them.

        Returns (victims, blocks ``after`` added, (n_small, n_main, next_seq)).
        Up to ``n`` victims: fewer only when the queues run dry (a peek)."""
        small_cap, main_cap = self.small_capacity, self.main_capacity
        ghost, hashes = self._ghost, self._hash
        n_small, n_main, next_seq = counts
        top_s, top_m, pop_s, pop_m, push = (
            heaps.top_s,
            heaps.top_m,
            heaps.pop_s,
            heaps.pop_m,
            heaps.push,
        )
        out: list[int] = []
        added = 0
        while len(out) < n:
            s_small = top_s()
            if s_small < 0 or n_small < small_cap:
                if top_m() >= 0:  # evict from M: its tail candidate
                    b = pop_m()
                    if freq[b]:
                        freq[b] -= 1
                        seq[b] = next_seq
                        push(next_seq, b, True)
                        next_seq += 1
                        continue
                    n_main -= 1
                    queue[b] = _NONE
                elif s_small < 0:
                    break  # nothing evictable left (a peek past the end)
                else:
                    b = -1
            else:
                b = -1
            if b < 0:  # evict from S (due, or M has no candidate)
                b = pop_s()
                n_small -= 1
                if freq[b]:
                    freq[b] = 0
                    queue[b] = _MAIN
                    n_main += 1
                    seq[b] = next_seq
                    push(next_seq, b, True)
                    next_seq += 1
                    continue
                queue[b] = _NONE
                if real:  # the hash of a block evicted from S enters G
                    ghost[hashes[b]] = None
                    if len(ghost) > main_cap:
                        ghost.popitem(last=False)
            heaps.evicted(b)
            if real:
                hashes[b] = None
            out.append(b)
            if after is not None:
                a = after(b)
                if a >= 0:  # add(a)
                    heaps.revive(a)
                    added += 1
                    push(seq[a], a, queue[a] == _MAIN)
        return out, added, (n_small, n_main, next_seq)

    def __len__(self) -> int:
        return self._n_ev

    def __contains__(self, block_id: object) -> bool:
        ev = self._ev
        return type(block_id) is int and 0 <= block_id < len(ev) and ev[block_id]

    # -- lifecycle -----------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        if block_id >= len(self._queue):
            self._grow(block_id)
        ghost = self._ghost
        if block_hash in ghost:
            del ghost[block_hash]
            self._queue[block_id] = _MAIN
            self._n_main += 1
        else:
            self._queue[block_id] = _SMALL
            self._n_small += 1
        s = self._next_seq
        self._next_seq = s + 1
        self._seq[block_id] = s
        self._freq[block_id] = 0
        self._ev[block_id] = False
        self._hash[block_id] = block_hash
        if self.capacity is None:
            cached = self._n_small + self._n_main
            if cached > self._max_cached:
                self._max_cached = cached
                self._resize()

    def on_hit(self, block_id: int) -> None:
        freq = self._freq
        if block_id < len(freq) and freq[block_id] < _MAX_FREQ:
            freq[block_id] += 1

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        q = self._queue[block_id]
        if q == _SMALL:
            self._n_small -= 1
        elif q == _MAIN:
            self._n_main -= 1
        if self._ev[block_id]:  # the pool calls remove() first; tolerate a direct call
            self._ev[block_id] = False
            self._n_ev -= 1
        self._queue[block_id] = _NONE
        self._seq[block_id] = -1
        self._freq[block_id] = 0
        self._hash[block_id] = None

    def reset(self) -> None:
        self._queue: list[int] = []  # per block: _NONE / _SMALL / _MAIN
        self._hash: list[Hashable | None] = []  # per block: its hash while cached
        self._seq: list[int] = []  # per block: sequence number of its queue position
        self._freq: list[int] = []  # per block: 0..3
        self._ev: list[bool] = []  # per block: evictable now
        self._heap_s: list[int] = []  # sequence numbers of evictable S members (+ stale)
        self._heap_m: list[int] = []
        self._slot: dict[int, int] = {}  # sequence number in a heap -> block id
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()  # oldest first
        self._next_seq = 0
        self._n_small = 0  # blocks in S (in use or evictable)
        self._n_main = 0
        self._n_ev = 0
        self._max_cached = 0
        self._resize()
        if self.capacity:
            self._grow(self.capacity - 1)

    def stats(self) -> dict:
        """Queue sizes (blocks in use included) and the ghost's length."""
        return {
            "small": self._n_small,
            "main": self._n_main,
            "ghost": len(self._ghost),
            "evictable": self._n_ev,
            "small_capacity": self.small_capacity,
            "main_capacity": self.main_capacity,
        }
