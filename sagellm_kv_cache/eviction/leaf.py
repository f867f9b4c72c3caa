"""Leaf-only eviction: any policy, restricted to blocks no cached block descends from.

A radix-tree cache (SGLang's ``RadixCache.evict``) only ever evicts leaves,
so a cached suffix never outlives its prefix. ``LeafOnly(inner)`` gives the
same guarantee to any policy of this package, without a tree walk::

    make_policy("leaf:lru")                 # registry name: "leaf:" + inner name
    make_policy("s3fifo", leaf_only=True)   # the same, as an option
    LeafOnly(SLRUPolicy())                  # or wrap an instance

Descendancy: ``on_cached(b, h, parent)`` makes ``b`` a child of ``parent``
when ``parent`` is cached at that moment (a parent id that is not cached, e.g.
a duplicate block whose hash another block already held, makes ``b`` a
root). Each block counts its cached children; a child's eviction or removal
decrements its parent's count. The link is cut when either end's hash is
dropped (an invalidated parent no longer blocks anything, and a block id
cached again later starts with no children: links are tagged with the
parent's caching incarnation, so a stale link is never decremented).

Evictable blocks are either *eligible* (no cached child: they are in the
inner policy, which orders them) or *blocked* (kept in a set here). A blocked
block enters the inner policy (``inner.add``, as if just released) when its
last cached child goes, which can happen between two pops of one
``pop_victims(n)`` batch, so a batch may evict a suffix and then the prefix
it uncovered. ``pop_victims(n)`` is all-or-nothing: when ``n`` exceeds the
eligible count it first checks, without side effects, that cascading
uncovering can supply ``n`` victims (O(n) in the blocks involved) and raises
``KVNoVictimError`` with nothing changed otherwise.

``len(policy)`` and ``in`` count every evictable block, eligible or blocked,
because the pool's accounting (free + evictable) relies on it; a pool may
therefore be refused an allocation it could afford on paper (the blocked
blocks hold in-use descendants): ``KVNoVictimError``, pool unchanged.
``available_victims(limit)`` says how many victims could be had now (a
caller that wants "evict up to n" should ask it first). Every event is O(1)
plus the inner policy's cost.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Hashable, Iterable

from ..errors import KVConfigError
from .base import EvictionPolicy

__all__ = ["LeafOnly"]


class LeafOnly(EvictionPolicy):
    """Wrap ``inner`` so that only leaf blocks (no cached child) are victims.

    Args:
        inner: the policy that orders eligible blocks (an instance).
        clock: defaults to the inner policy's clock.
    """

    name = "leaf"
    _next_inc: int  # the next caching incarnation
    description = (
        "leaf-only wrapper: a block is a victim only when no cached block descends from it"
    )

    def __new__(cls, inner: EvictionPolicy | None = None, clock=None):
        # the pool calls on_evicted only on policies whose class overrides it
        hook = getattr(type(inner), "on_evicted", EvictionPolicy.on_evicted)
        if cls is LeafOnly and hook is not EvictionPolicy.on_evicted:
            cls = _LeafOnlyForwardingEvictions
        return super().__new__(cls)

    def __init__(self, inner: EvictionPolicy, clock=None) -> None:
        if not isinstance(inner, EvictionPolicy):
            raise KVConfigError(f"LeafOnly wraps an EvictionPolicy instance, got {inner!r}")
        if isinstance(inner, LeafOnly):
            raise KVConfigError("LeafOnly: the policy is already leaf-only")
        super().__init__(clock or inner.clock)
        self.inner = inner
        self.name = f"leaf:{inner.name}"
        self.tracks_hits = inner.tracks_hits
        self.stable_victim_order = inner.stable_victim_order
        kind = type(inner)
        self._inner_on_cached = (
            inner.on_cached if kind.on_cached is not EvictionPolicy.on_cached else None
        )
        # a cascading peek needs the inner policy's; without one, peeks run on a copy
        self._inner_peeks = kind.peek_cascade is not EvictionPolicy.peek_cascade
        self.reset()

    def set_capacity(self, num_blocks: int | None) -> None:
        super().set_capacity(num_blocks)
        self.inner.set_capacity(num_blocks)
        if num_blocks:
            self._grow(num_blocks - 1)

    def _grow(self, b: int) -> None:
        n = max(b + 1, 2 * len(self._inc), 16) - len(self._inc)
        self._inc += [0] * n
        self._children += [0] * n
        self._parent += [-1] * n
        self._pinc += [0] * n

    def _detach(self, b: int) -> None:
        """``b`` stops being cached: its parent loses a child (and may become eligible)."""
        p = self._uncover(b)
        if p >= 0:
            self.inner.add(p)

    # -- evictable set -------------------------------------------------------
    def add(self, block_id: int) -> None:
        if self._children[block_id]:
            self._blocked.add(block_id)
        else:
            self.inner.add(block_id)

    def add_many(self, block_ids: Iterable[int]) -> None:
        ch = self._children
        ids = block_ids if isinstance(block_ids, list) else list(block_ids)
        eligible = [b for b in ids if not ch[b]]
        if len(eligible) != len(ids):
            self._blocked.update([b for b in ids if ch[b]])
        self.inner.add_many(eligible)

    def remove(self, block_id: int) -> None:
        if block_id in self._blocked:
            self._blocked.remove(block_id)
        else:
            self.inner.remove(block_id)

    def remove_many(self, block_ids: Iterable[int]) -> None:
        blocked = self._blocked
        if not blocked:
            self.inner.remove_many(block_ids)
            return
        ids = block_ids if isinstance(block_ids, list) else list(block_ids)
        rest = [b for b in ids if b not in blocked]
        if len(rest) != len(ids):
            blocked.difference_update(ids)
        self.inner.remove_many(rest)

    def available_victims(self, limit: int) -> int:
        """How many victims (at most ``limit``) ``pop_victims`` could give now, counting the
        blocked blocks that popping would uncover. No side effect; O(1) when the eligible
        blocks suffice, else O(blocks involved)."""
        return self.num_victims(limit)

    def is_protected(self, block_id: int) -> bool:
        return self.inner.is_protected(block_id)

    def num_victims(self, limit: int, exclude: Collection[int] = ()) -> int:
        """``available_victims`` with the evictable blocks in ``exclude`` taken out first:
        they are no victims and uncover nothing. Only the inner policy's *eligible*
        blocks count (a TTL-protected block is evictable but no victim), and a parent
        the cascade uncovers counts only when the inner policy would accept it."""
        inner = self.inner
        ex = exclude if isinstance(exclude, set | frozenset | dict) else set(exclude)
        ex_inner = [b for b in ex if b in inner] if ex else ()
        got = inner.num_victims(limit + len(ex_inner), ex_inner)
        if got >= limit:
            return limit
        if not self._blocked:
            return got
        protected = inner.is_protected
        uncover = self._would_uncover()
        stack = inner.peek_victims(got + len(ex_inner))
        if ex_inner:
            stack = [b for b in stack if b not in ex]
        while stack:
            p = uncover(stack.pop())
            if p >= 0 and p not in ex and not protected(p):
                got += 1
                if got >= limit:
                    return limit
                stack.append(p)
        return got

    def pop_victims(self, n: int) -> list[int]:
        # all or nothing: count first (len(inner) may include TTL-protected blocks)
        if self.num_victims(n) < n:
            raise self._no_victim()
        return self.inner.pop_cascade(n, self._uncover)

    def _uncover(self, v: int) -> int:
        """Victim ``v`` left: its parent loses a child; the parent if that made it a victim
        candidate (to be added to the inner policy), else -1."""
        inc = self._inc
        inc[v] = 0
        p = self._parent[v]
        if p >= 0:
            self._parent[v] = -1
            if inc[p] == self._pinc[v]:
                c = self._children[p] - 1
                self._children[p] = c
                if not c and p in self._blocked:
                    self._blocked.remove(p)
                    return p
        return -1

    def pop_victim(self) -> int:
        return self.pop_victims(1)[0]

    def peek_victims(self, n: int) -> list[int]:
        """``pop_victims``' order without popping: the inner policy's cascading peek, with
        the parents the victims would uncover counted as added; O(n log size)."""
        if not self._inner_peeks:
            clone = self._clone()
            out: list[int] = []
            while len(out) < n and clone.inner.num_victims(1):
                out.append(clone.inner.pop_cascade(1, clone._uncover)[0])
            return out
        return self.inner.peek_cascade(n, self._would_uncover())

    def _would_uncover(self) -> Callable[[int], int]:
        """``_uncover`` without side effects: a function of victims in pop order giving the
        parent each would make a candidate (else -1), counting children in its own dict."""
        parent, inc, pinc, children, blocked = (
            self._parent,
            self._inc,
            self._pinc,
            self._children,
            self._blocked,
        )
        left: dict[int, int] = {}  # children left, for parents met so far

        def uncover(v: int) -> int:
            p = parent[v]
            if p >= 0 and inc[p] == pinc[v]:
                c = left.get(p, children[p]) - 1
                left[p] = c
                if not c and p in blocked:
                    return p
            return -1

        return uncover

    def _clone(self) -> LeafOnly:
        # clocks may be bound methods of a pool: share them instead of copying the pool
        memo = {id(self.clock): self.clock, id(self.inner.clock): self.inner.clock}
        return copy.deepcopy(self, memo)

    def __len__(self) -> int:
        return len(self.inner) + len(self._blocked)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._blocked or block_id in self.inner

    @property
    def num_blocked(self) -> int:
        """Evictable blocks that are not victims yet (a cached block descends from them)."""
        return len(self._blocked)

    # -- lifecycle -----------------------------------------------------------
    def on_cached(self, block_id: int, block_hash: Hashable, parent_block_id: int) -> None:
        inc = self._inc
        if block_id >= len(inc):
            self._grow(block_id)
            inc = self._inc
        i = self._next_inc
        self._next_inc = i + 1
        inc[block_id] = i
        children = self._children
        children[block_id] = 0
        p = parent_block_id
        if 0 <= p < len(inc) and inc[p]:
            self._parent[block_id] = p
            self._pinc[block_id] = inc[p]
            children[p] += 1
            # a parent held by another request may be evictable now: it stops being a leaf
            if children[p] == 1 and p in self.inner:
                self.inner.remove(p)
                self._blocked.add(p)
        else:
            self._parent[block_id] = -1
        if self._inner_on_cached is not None:
            self._inner_on_cached(block_id, block_hash, parent_block_id)

    def on_hit(self, block_id: int) -> None:
        self.inner.on_hit(block_id)

    def on_removed(self, block_id: int, block_hash: Hashable) -> None:
        self._blocked.discard(block_id)  # the pool calls remove() first; tolerate a direct call
        self.inner.on_removed(block_id, block_hash)
        self._children[block_id] = 0
        self._detach(block_id)

    def reset(self) -> None:
        self.inner.reset()
        self._inc: list[int] = []  # per block: caching incarnation (0 = not cached)
        self._children: list[int] = []  # per block: cached children
        self._parent: list[int] = []  # per block: parent id at caching time (-1: root)
        self._pinc: list[int] = []  # per block: the parent's incarnation at that time
        self._blocked: set[int] = set()  # evictable blocks with cached children
        self._next_inc = 1
        if self.capacity:
            self._grow(self.capacity - 1)

    def __repr__(self) -> str:
        return f"LeafOnly({self.inner!r}, blocked={len(self._blocked)})"


class _LeafOnlyForwardingEvictions(LeafOnly):
    """``LeafOnly`` over a policy that overrides ``on_evicted`` (the pool skips the hook
    for policies that do not, so the plain wrapper does not override it either)."""

    def on_evicted(self, block_id: int, block_hash: Hashable) -> None:
        self.inner.on_evicted(block_id, block_hash)
