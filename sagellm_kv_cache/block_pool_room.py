"""The room rule of a ``BlockPool``: can ``need`` new blocks be had now, once the
blocks of a request's cached run are taken, and if not, why.

Written once for every caller that must know before it changes anything:
``KVPool``'s admission (``alloc_with_prefix``, ``peek_admission``,
``obtainable_blocks``, the scheduler's plan, the simulator), ``BlockPool.serve``
and a lower tier's insert. ``BlockPool.allocate`` raises the same error when it
runs short. Nothing here changes the pool.

The supply of a request is the free blocks (with a growable pool's growth room)
and the evictable blocks other than its hits: a hit that is evictable now
leaves the policy when the request takes it, so it cannot also be a victim.
Each hit counts once, however often the request names it. A policy that
refuses some evictable blocks (TTL-protected, or not leaves under ``leaf:*``)
is asked how many victims it would give with the hits taken out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from .errors import KVCacheError, KVNoVictimError, KVPoolFullError

if TYPE_CHECKING:
    from .block_pool import BlockPool

__all__ = ["Room", "pool_full_error", "room", "room_error"]


class Room(NamedTuple):
    """What a pool can give a request now (``room``)."""

    #: None (``need`` blocks can be had), ``"no_blocks"`` (fewer free and evictable
    #: blocks than ``need``) or ``"no_victims"`` (enough, but the policy refuses some)
    reason: str | None
    #: free blocks, plus the growth room of a growable pool
    free: int
    #: evictable blocks other than the request's hits
    evictable: int
    #: the victims the request would get beyond ``free`` (at most what it needs)
    victims: int

    @property
    def obtainable(self) -> int:
        """Blocks an allocation could obtain, the policy's refusals aside."""
        return self.free + self.evictable

    @property
    def supply(self) -> int:
        """Blocks the request would get now: ``free`` plus ``victims``."""
        return self.free + self.victims


def room(bp: BlockPool, need: int, hits: Sequence[int] = ()) -> Room:
    """Whether ``need`` new blocks can be had once the valid block ids ``hits``
    (a cached run about to be taken) are taken. Changes nothing."""
    n_free = len(bp.free_queue) + (bp.growth_room if bp.growable else 0)
    n_ev = len(bp.policy)
    taken = 0
    if hits:
        taken = bp.num_evictable_among(hits)
        if taken > 1 and len(set(hits)) < len(hits):  # count each hit once
            hits = list(dict.fromkeys(hits))
            taken = bp.num_evictable_among(hits)
        n_ev -= taken
    beyond = need - n_free
    if beyond <= 0:
        return Room(None, n_free, n_ev, 0)
    if bp.policy_may_refuse:
        ev_hits = bp.evictable_among(hits) if taken else ()
        got = min(bp.policy.num_victims(beyond, ev_hits), beyond)
    else:
        got = min(beyond, n_ev)
    if beyond > n_ev:
        return Room("no_blocks", n_free, n_ev, got)
    return Room("no_victims" if got < beyond else None, n_free, n_ev, got)


def pool_full_error(bp: BlockPool, need: int, free: int, evictable: int) -> KVPoolFullError:
    """The error of a pool with fewer than ``need`` free and evictable blocks."""
    return KVPoolFullError(
        f"need {need} blocks, only {free} free + {evictable} evictable of {bp.num_blocks}",
        needed=need,
        free=free,
        evictable=evictable,
    )


def room_error(bp: BlockPool, r: Room, need: int) -> KVCacheError:
    """The error ``allocate(need)`` raises where ``r = room(bp, need, hits)`` refused."""
    if r.reason == "no_blocks":
        return pool_full_error(bp, need, r.free, r.evictable)
    beyond = need - r.free
    return KVNoVictimError(
        f"{bp.policy.name}: need {beyond} victims beyond {r.free} free blocks; "
        f"the policy gives {r.victims} now",
        needed=beyond,
        victims=r.victims,
    )
