"""Admission of ``KVPool``: may ``n`` new blocks be had beyond a cached run, and why not.

One rule for ``alloc_with_prefix``, ``peek_admission``, ``obtainable_blocks``,
the scheduler's plan and the simulator: ``admission_reason`` (a request larger
than the pool, or than its supply) over the block pool's room rule
(``block_pool_room.room``: free blocks and the evictable ones other than the
hits, and the policy's say on victims), which ``BlockPool.serve`` and the lower
tiers ask too. Nothing here changes the pool, so a refusal leaves it exactly
as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._pool_base import PoolBase
from .block_pool_room import room
from .checks import check_count
from .errors import KVBudgetExceededError, KVNoVictimError

__all__ = ["PoolAdmissionMixin", "admission_reason"]


def admission_reason(n_new: int, n_hit: int, obtainable: int, num_blocks: int) -> str | None:
    """The block budget part of admission, one rule for the pool, the scheduler's plan
    and the simulator: ``"too_large"`` when the request's blocks (``n_hit`` cached
    plus ``n_new`` new) exceed the whole pool, ``"no_blocks"`` when more new blocks
    are needed than ``obtainable`` (free plus evictable, less the evictable hits it
    takes), else ``None``."""
    if n_new + n_hit > num_blocks:
        return "too_large"
    if n_new > obtainable:
        return "no_blocks"
    return None


class PoolAdmissionMixin(PoolBase):
    """``obtainable_blocks`` / ``peek_admission`` and the check ``alloc_with_prefix`` runs."""

    def _admit(self, n_new: int, hit: list[int], num_tokens: int) -> None:
        """Raise unless ``n_new`` blocks can be had once the ``hit`` blocks are taken.

        Hit blocks that are evictable now stop counting as obtainable once
        taken; a policy that refuses some evictable blocks (TTL, leaf-only) is
        asked how many victims it would give with the hits taken out. Nothing
        is changed here, so a refusal leaves the pool exactly as it was.
        """
        reason, obtainable, got = self._admission(n_new, hit)
        if reason in ("too_large", "no_blocks"):
            raise KVBudgetExceededError(
                f"request of {num_tokens} tokens needs {n_new} new blocks beyond its "
                f"{len(hit)} cached ones; {obtainable} obtainable",
                needed=n_new,
                hit=len(hit),
            )
        if reason == "no_victims":
            need = n_new - self._blocks.num_free
            raise KVNoVictimError(
                f"{self._blocks.policy.name}: request of {num_tokens} tokens needs {need} "
                f"victims beyond {self._blocks.num_free} free blocks; the policy gives {got} "
                "now (the rest are protected or not leaves)",
                needed=need,
                victims=got,
            )

    def _admission(self, n_new: int, hit: Sequence[int]) -> tuple[str | None, int, int]:
        """The admission rule, written once (``alloc_with_prefix``, ``peek_admission``,
        the simulator): ``(reason, obtainable, victims)``; ``reason`` is ``None`` when
        ``n_new`` blocks beyond the cached run ``hit`` can be had now, else
        ``"too_large"`` (more than the whole pool), ``"no_blocks"`` (more than free +
        evictable blocks once the hits are taken) or ``"no_victims"`` (the policy
        refuses some evictable blocks now). Changes nothing; the caller holds the lock."""
        r = room(self._blocks, n_new, hit)
        n_hit = len(hit)
        if n_new + n_hit > self.num_blocks and len(set(hit)) < n_hit:
            n_hit = len(set(hit))  # a block the request names twice is one block of the pool
        reason = admission_reason(n_new, n_hit, r.obtainable, self.num_blocks)
        if reason is not None:
            return reason, r.obtainable, 0
        if r.reason == "no_victims":
            return r.reason, r.obtainable, r.victims
        return None, r.obtainable, 0

    def obtainable_blocks(self, hit_block_ids: Sequence[int] = ()) -> int:
        """Blocks an allocation could obtain now beyond ``hit_block_ids`` (a request's
        cached leading run, from ``match_prefix``, which it would take): free plus
        evictable blocks, less the evictable hits. Changes nothing.

        Raises:
            KVInvalidTypeError / KVInvalidInputError: bad block ids.
        """
        with self._lock:
            hit = self._blocks.check_block_ids(hit_block_ids, "hit_block_ids")
            return self._admission(0, hit)[1]

    def peek_admission(self, num_new_blocks: int, hit_block_ids: Sequence[int] = ()) -> str | None:
        """Why allocating ``num_new_blocks`` beyond the cached run ``hit_block_ids``
        would fail now, or ``None`` when it would succeed (the rule ``alloc_with_prefix``
        applies): ``"too_large"``, ``"no_blocks"`` or ``"no_victims"``. Changes nothing.

        Raises:
            KVInvalidTypeError / KVInvalidInputError: a bad count or bad block ids.
        """
        n_new = check_count(num_new_blocks, "num_new_blocks")
        with self._lock:
            hit = self._blocks.check_block_ids(hit_block_ids, "hit_block_ids")
            return self._admission(n_new, hit)[0]
