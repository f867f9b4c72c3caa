"""``BlockPool.serve``: one request's whole life in the pool, in one pass.

A request that is admitted, written and finished before the next one starts
(a sequential replay, a one-shot lookup-and-store) makes the pool do five
moves::

    hit = match_prefix(h)          the leading run of cached blocks
    touch(hit)                     take them (evictable ones leave the policy)
    new = allocate(len(h) - k)     free blocks first, then victims in policy order
    cache_blocks(hit + new, h, k)  register the new full blocks
    release(hit + new)             tail-first: registered blocks become evictable

``serve`` does exactly that, with the same events in the same order (policy
``remove_many`` / ``on_hit`` / ``pop_victims`` / ``on_evicted`` / ``on_cached`` /
``add_many``, hooks' ``on_evict_many`` then ``on_blocks_cached``), the same
counters and the same final state, but in one function with its locals bound
once and without re-checking the ids it produced itself. A plain ``LRUPolicy``
pool with no hooks and no block in use (a sequential replay) takes a shorter
path on the policy's order (``LRUPolicy.order``): the reference counts of the
request's blocks go up and back down within the call, so it leaves them alone.
``tests/test_block_pool_serve.py`` proves both paths equal to the five calls on
random request streams.

This module is part of ``BlockPool`` (kept apart for size), so it reads the
pool's private fields. Unlike the five calls, ``serve`` checks that the new
blocks can be had before it changes anything: a request that does not fit
raises ``KVPoolFullError`` (or ``KVNoVictimError`` when the policy refuses
victims) with the pool unchanged.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from itertools import islice
from typing import TYPE_CHECKING

from .errors import KVInvalidInputError, KVNoVictimError, KVPoolFullError
from .hashing import check_block_hashes

if TYPE_CHECKING:
    from .block_pool import BlockPool

__all__ = ["serve"]

_NONE: frozenset[int] = frozenset()


def serve(pool: BlockPool, block_hashes: Sequence[Hashable]) -> tuple[list[int], int]:
    """Serve one request whose full blocks have ``block_hashes``, start to finish.

    Returns:
        ``(block_ids, num_hit)``: the blocks the request used (its cached run
        first, then the new ones, in position order; they are all released
        again when this returns) and the length of its cached run.

    Raises:
        KVInvalidTypeError / KVInvalidInputError: a hash that is unhashable or
            ``None``; nothing changed.
        KVPoolFullError: fewer free + evictable blocks than the misses need once
            the hits are taken; nothing changed.
        KVNoVictimError: the policy gives fewer victims than needed (TTL, leaf-only);
            nothing changed.
    """
    if type(block_hashes) is not list:
        block_hashes = check_block_hashes(block_hashes)
    cached = pool.cached
    try:
        ids: list = list(map(cached.get, block_hashes))  # one C pass: the cached run
    except TypeError:  # an unhashable hash: the full check says which
        check_block_hashes(block_hashes)
        raise  # pragma: no cover - check_block_hashes raises first
    n = len(ids)
    try:
        k = ids.index(None)
    except ValueError:
        k = n
    else:  # None is never a key, so a None hash is a miss: at or after k
        if None in block_hashes[k:]:
            raise KVInvalidInputError("serve: a block hash is None (None means 'no hash')")
    order = pool._lru_order
    if (
        order is not None
        and not pool.hooks
        and n <= pool.num_blocks == len(pool.free_queue) + len(order)  # no block in use
    ):
        return _serve_lru(pool, block_hashes, ids, k, order), k
    return _serve_any(pool, block_hashes, ids, k), k


def _serve_lru(pool: BlockPool, hs: list, ids: list, k: int, order: OrderedDict) -> list[int]:
    """The plain-LRU path: no hooks, caching on, a fixed pool with no block in use
    (every cached block is evictable, so every hit is in the order) and the request
    no larger than the pool (its victims exist).

    Reference counts go up and back down within the call, so they are left alone.
    The five calls take the hits out of the order, evict from its least recent
    end, then put the registered new blocks and the hits back at its most recent
    end, tail-first. Here the hits stay where they are, a victim that is a hit
    is passed over (and put back), and the hits move to the most recent end
    (``move_to_end``: no unlinking) once the new blocks are in: the same order.
    """
    n = len(ids)
    need = n - k
    move = order.move_to_end
    if not need:  # all hits: touch + release is moving them to the end, tail-first
        deque(map(move, reversed(ids)), 0)
        return ids
    free_q = pool.free_queue
    n_free = len(free_q)
    cached = pool.cached
    hashes = pool.block_hashes
    parents = pool.parent_ids
    # allocate (free blocks first, then victims from the least recent end) and
    # cache_blocks (each new block under its hash unless the hash is held)
    setdefault = cached.setdefault
    prev = ids[k - 1] if k else -1
    dup = 0
    misses = islice(hs, k, None)
    n_ev = need - n_free
    popitem = order.popitem
    # hits met among the victims: passed over, put back before the hits move
    hits = set(ids[:k]) if k and n_ev > 0 else _NONE
    passed: list[int] = []
    if n_ev > 0 and ids[k:].count(None) != need:
        # a miss's hash is cached (past the first miss): a victim may hold it, so every
        # victim goes first, as in allocate, then the blocks are registered
        victims: list[int] = []
        while len(victims) < n_ev:
            b = popitem(False)[0]
            (passed if b in hits else victims).append(b)
        for b in victims:
            del cached[hashes[b]]
            hashes[b] = None
            parents[b] = -1
        new = list(free_q)
        free_q.clear()
        new += victims
        for b, h in zip(new, misses):
            c = setdefault(h, b)
            if c is b:
                hashes[b] = h
                parents[b] = prev
                prev = b
            else:  # the hash is cached on another block: this one returns to FREE
                prev = c
                dup += 1
    else:
        # no victim holds a miss's hash: each block is registered as soon as it is taken
        new = []
        append = new.append
        if n_free:
            popleft = free_q.popleft
            for h in islice(misses, need if n_ev <= 0 else n_free):
                b = popleft()
                append(b)
                c = setdefault(h, b)
                if c is b:
                    hashes[b] = h
                    parents[b] = prev
                    prev = b
                else:  # a hash repeated in the request: this block returns to FREE
                    prev = c
                    dup += 1
        for h in misses if n_ev > 0 else ():
            b = popitem(False)[0]
            while b in hits:
                passed.append(b)
                b = popitem(False)[0]
            append(b)
            del cached[hashes[b]]
            c = setdefault(h, b)
            if c is b:
                hashes[b] = h
                parents[b] = prev
                prev = b
            else:
                hashes[b] = None
                parents[b] = -1
                prev = c
                dup += 1
    if n_ev > 0:
        pool.num_evictions += n_ev
        by = pool.evictions_by_reason
        by["capacity"] = by.get("capacity", 0) + n_ev
    pool.num_cached_total += need - dup
    # release, tail-first: the registered new blocks, then the hits
    if dup:
        for b in reversed(new):
            if hashes[b] is None:
                free_q.append(b)
            else:
                order[b] = None
    else:
        for b in reversed(new):
            order[b] = None
    ids[k:] = new
    if k:
        for b in passed:
            order[b] = None
        deque(map(move, reversed(ids[:k])), 0)
    return ids


def _serve_any(pool: BlockPool, hs: list, ids: list, k: int) -> list[int]:
    """Any policy, hooks, pins, growth: the pool's own steps (``touch``, ``allocate``,
    registration, ``release`` without re-checking the ids), once the room is known."""
    hits = ids[:k]
    need = len(ids) - k
    if need > len(pool.free_queue):
        _check_room(pool, hits, need)
    pool._take(hits)
    ids[k:] = pool.allocate(need)
    if pool.enable_caching:
        pool._register(ids, hs, k)
    pool._drop(ids)
    return ids


def _check_room(pool: BlockPool, hits: list[int], need: int) -> None:
    """Raise what ``allocate(need)`` would once ``hits`` are taken, with nothing changed."""
    n_free = len(pool.free_queue)
    grow = min(need - n_free, pool.growth_room) if pool.growable else 0
    n_victims = need - n_free - grow
    policy = pool.policy
    if n_victims <= 0 or (n_victims <= len(policy) - len(hits) and not pool.policy_may_refuse):
        return  # enough victims even if every hit were evictable now
    ev = pool.evictable_among(list(dict.fromkeys(hits)))  # they leave the policy when taken
    evictable = len(policy) - len(ev)
    if n_victims > evictable:
        raise KVPoolFullError(
            f"need {need} blocks, only {n_free} free + {evictable} evictable of {pool.num_blocks}",
            needed=need,
            free=n_free,
            evictable=evictable,
        )
    if pool.policy_may_refuse and policy.num_victims(n_victims, ev) < n_victims:
        raise KVNoVictimError(
            f"{policy.name}: need {n_victims} victims beyond {n_free} free blocks; "
            "the policy gives fewer now",
            needed=n_victims,
        )
