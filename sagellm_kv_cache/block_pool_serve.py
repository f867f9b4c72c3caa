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
request's blocks go up and back down within the call, so it leaves them alone,
and a victim reused as a new block stays in the order and is moved to its most
recent end with the rest of the request (no unlinking and relinking).
``tests/test_block_pool_serve.py`` proves both paths equal to the five calls on
random request streams.

This module is part of ``BlockPool`` (kept apart for size), so it reads the
pool's private fields. Unlike the five calls, ``serve`` checks that the new
blocks can be had before it changes anything: a request that does not fit
raises ``KVPoolFullError`` (or ``KVNoVictimError`` when the policy refuses
victims) with the pool unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from functools import partial
from itertools import islice, takewhile
from operator import is_not
from typing import TYPE_CHECKING

from .block_pool_room import room, room_error
from .errors import KVInvalidInputError
from .hashing import check_block_hashes

if TYPE_CHECKING:
    from .block_pool import BlockPool

__all__ = ["serve"]

#: ``None`` is no hash: a set to test the misses against (hashing each checks it too)
_NONE = frozenset([None])
#: ``x is not None``, in C: the cached run ends at the first ``cached.get`` miss
_IS_ID = partial(is_not, None)


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
        # the cached run in one C pass that stops at the first miss
        ids: list = list(takewhile(_IS_ID, map(cached.get, block_hashes)))
        k = len(ids)
        misses = block_hashes[k:]
        # hashing each miss checks that it is hashable, and None is no hash
        if not _NONE.isdisjoint(misses):
            raise KVInvalidInputError("serve: a block hash is None (None means 'no hash')")
    except TypeError:  # an unhashable hash: the full check says which
        check_block_hashes(block_hashes)
        raise  # pragma: no cover - check_block_hashes raises first
    n = len(block_hashes)
    order = pool._lru_order
    if (
        order is not None
        and not pool.hooks
        and n <= pool.num_blocks == len(pool.free_queue) + len(order)  # no block in use
    ):
        return _serve_lru(pool, misses, ids, k, order), k
    return _serve_any(pool, block_hashes, ids, k), k


def _serve_lru(pool: BlockPool, misses: list, ids: list, k: int, order: OrderedDict) -> list[int]:
    """The plain-LRU path: no hooks, caching on, a fixed pool with no block in use
    (every cached block is evictable, so every hit is in the order) and the request
    no larger than the pool (its victims exist). ``ids`` holds the hits, ``misses``
    the other hashes.

    Reference counts go up and back down within the call, so they are left alone.
    The five calls take the hits out of the order, evict from its least recent
    end (hash dropped, block unlinked), then register the new blocks and put them
    and the hits back at its most recent end, tail-first. Here the victims are
    the least recent blocks that are not hits, their hashes go, the new blocks
    are registered (``setdefault`` in one C pass, after every victim's hash went,
    as in ``allocate`` then ``cache_blocks``), and release moves the request's
    blocks to the most recent end, tail-first (``move_to_end``): a victim reused
    as a new block never leaves the order, and a free block joins it at its final
    place, so the order ends the same.
    """
    need = len(misses)
    move = order.move_to_end
    if not need:  # all hits: touch + release is moving them to the end, tail-first
        any(map(move, reversed(ids)))
        return ids
    free_q = pool.free_queue
    n_free = len(free_q)
    cached = pool.cached
    hashes = pool.block_hashes
    # allocate: free blocks first, then victims from the least recent end
    n_ev = need - n_free
    if n_ev > 0:
        victims = list(islice(order, n_ev))
        if k and not set(victims).isdisjoint(ids):  # a hit is passed over
            victims = _victims(order, n_ev, set(ids))
        for b in victims:
            del cached[hashes[b]]
        pool.num_evictions += n_ev
        by = pool.evictions_by_reason
        by["capacity"] = by.get("capacity", 0) + n_ev
        new = victims
    else:
        victims = []
        new = []
    take: list[int] = []
    if n_free:  # free blocks: not in the order yet
        take = list(free_q) if n_ev >= 0 else [free_q.popleft() for _ in range(need)]
        if n_ev >= 0:
            free_q.clear()
        new = take + victims
    # cache_blocks: each new block under its hash, unless the hash is held by then
    held = list(map(cached.setdefault, misses, new))
    if held != new:  # some hashes were held: those blocks go back to FREE
        order.update(dict.fromkeys(take))
        kept = ids + _drop_held(pool, order, misses, ids, new, held)
        ids += new
        any(map(move, reversed(kept)))  # release, tail-first
        return ids
    parents = pool.parent_ids
    prev = ids[-1] if k else -1
    for b, h in zip(new, misses):
        hashes[b] = h
        parents[b] = prev
        prev = b
    pool.num_cached_total += need
    # release, tail-first, to the most recent end: the victims (in the order), the
    # free blocks (which join it there, each once), then the hits
    if victims:
        any(map(move, reversed(victims)))
    if take:
        order.update(dict.fromkeys(reversed(take)))
    if k:
        any(map(move, reversed(ids)))
    ids += new
    return ids


def _victims(order: OrderedDict, n: int, hits: set[int]) -> list[int]:
    """The ``n`` least recent blocks of the order that are not hits."""
    out = []
    for b in order:
        if b not in hits:
            out.append(b)
            if len(out) == n:
                break
    return out


def _drop_held(
    pool: BlockPool, order: OrderedDict, misses: list, ids: list, new: list[int], held: list[int]
) -> list[int]:
    """Registration when some new blocks' hashes were held (``held[j]``: the block the
    hash is on): those blocks return to FREE (tail-first, as release puts them) and
    the chain goes on through the holder. Returns the registered new blocks."""
    hashes = pool.block_hashes
    parents = pool.parent_ids
    prev = ids[-1] if ids else -1
    dup = []
    for b, h, c in zip(new, misses, held):
        if c is b:
            hashes[b] = h
            parents[b] = prev
            prev = b
        else:
            hashes[b] = None
            parents[b] = -1
            prev = c
            dup.append(b)
    pool.num_cached_total += len(new) - len(dup)
    for b in reversed(dup):
        del order[b]
    pool.free_queue.extend(reversed(dup))
    return [b for b in new if hashes[b] is not None]


def _serve_any(pool: BlockPool, hs: list, ids: list, k: int) -> list[int]:
    """Any policy, hooks, pins, growth: the pool's own steps (``touch``, ``allocate``,
    registration, ``release`` without re-checking the ids), once the room is known."""
    hits = ids[:k]
    need = len(hs) - k
    if need > len(pool.free_queue):
        r = room(pool, need, hits)
        if r.reason is not None:
            raise room_error(pool, r, need)
    pool._take(hits)
    ids[k:] = pool.allocate(need)
    if pool.enable_caching:
        pool._register(ids, hs, k)
    pool._drop(ids)
    return ids
