"""``EvictionManager`` (seed API): choose which freed handles to drop for a token budget.

The seed's face, not the core (nothing inside the package uses it): the core
evicts blocks through ``eviction/`` policies. ``sagellm_kv_cache.EvictionManager``
and ``sagellm_kv_cache.eviction.EvictionManager`` (the seed's import paths)
resolve here.

The block pool evicts single blocks through a policy (``EvictionPolicy``).
``EvictionManager`` is the handle-level view the seed package offers: given
``KVHandle`` objects, it picks the ones whose cached blocks should go to
free ``num_tokens_needed`` tokens, in the order of an ``EvictionStrategy``::

    mgr = EvictionManager(policy="lru", ttl_seconds=600)
    victims = mgr.select_victims(handles, num_tokens_needed=256)

Selection (``select_victims``):

1. Candidates are the handles with ``ref_count == 0`` (freed) and no pin;
   a handle in use or pinned is never selected.
2. With ``ttl_seconds``, candidates idle for longer than the TTL
   (``now - last_access_at > ttl_seconds``) come first, in strategy order.
3. The others follow by retention priority, lowest first
   (``handle.metadata["priority"]``, 0..100, ``default_priority`` when
   absent), in strategy order within a priority.
4. Handles are taken in that order until their ``num_tokens`` add up to
   ``num_tokens_needed``. If the candidates (or the first ``max_victims`` of
   them) cannot cover it, ``KVNoVictimError`` is raised and nothing is
   selected.

Strategies: ``LRUEviction`` (least recent ``last_access_at`` first) and
``FIFOEviction`` (oldest ``created_at`` first); ties keep the input order.
Any ``EvictionStrategy`` subclass may be passed instead.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral

from ..errors import KVAllPinnedError, KVConfigError, KVInvalidInputError, KVNoVictimError
from ..eviction.priority import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from ..handle import KVHandle

__all__ = ["EvictionManager", "EvictionStrategy", "FIFOEviction", "LRUEviction"]


class EvictionStrategy(ABC):
    """Orders handles for eviction: ``order(handles)[0]`` goes first."""

    name: str = "base"

    @abstractmethod
    def order(self, handles: Sequence[KVHandle]) -> list[KVHandle]:
        """The same handles, first victim first (a permutation of ``handles``)."""

    def get_policy_name(self):
        """Seed API: the strategy's ``EvictionPolicyName`` (its ``name`` when not a member)."""
        from ..eviction.registry import EvictionPolicyName

        try:
            return EvictionPolicyName(self.name)
        except ValueError:
            return self.name

    def select_victim(
        self, candidates: Sequence[KVHandle], num_tokens_needed: int, max_victims: int | None = None
    ) -> list[KVHandle]:
        """Seed API: ``EvictionManager(policy=self).select_victims`` without TTL or
        priorities: evictable candidates (no reference, no pin) in this strategy's
        order until their tokens reach ``num_tokens_needed``. An in-use or pinned
        handle is never selected (KVAllPinnedError when pins are all that stop it)."""
        return EvictionManager(self, default_priority=DEFAULT_PRIORITY).select_victims(
            candidates, num_tokens_needed, max_victims
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LRUEviction(EvictionStrategy):
    """Least recently used first: smallest ``last_access_at``; ties keep input order."""

    name = "lru"

    def order(self, handles: Sequence[KVHandle]) -> list[KVHandle]:
        return sorted(handles, key=lambda h: h.last_access_at)


class FIFOEviction(EvictionStrategy):
    """First created, first evicted: smallest ``created_at``; ties keep input order."""

    name = "fifo"

    def order(self, handles: Sequence[KVHandle]) -> list[KVHandle]:
        return sorted(handles, key=lambda h: h.created_at)


#: strategy name -> class
STRATEGIES: dict[str, type[EvictionStrategy]] = {"lru": LRUEviction, "fifo": FIFOEviction}


def _make_strategy(policy: object) -> EvictionStrategy:
    if isinstance(policy, EvictionStrategy):
        return policy
    if isinstance(policy, type) and issubclass(policy, EvictionStrategy):
        return policy()
    name = policy.value if isinstance(policy, enum.Enum) else policy
    if isinstance(name, str):
        cls = STRATEGIES.get(name.strip().lower())
        if cls is not None:
            return cls()
    raise KVConfigError(
        f"unknown eviction strategy {policy!r}; choose one of {sorted(STRATEGIES)} "
        "or pass an EvictionStrategy instance"
    )


def _is_count(x: object) -> bool:
    """An int >= 0 (numpy ints too; bools are not counts)."""
    return isinstance(x, Integral) and not isinstance(x, bool) and int(x) >= 0


class EvictionManager:
    """Handle-level victim selection with an LRU/FIFO strategy, a TTL and priorities.

    Args:
        policy: ``"lru"`` (default), ``"fifo"``, an ``EvictionPolicyName`` /
            enum with one of those values, an ``EvictionStrategy`` subclass or
            instance.
        ttl_seconds: handles idle for longer than this go first (None: no TTL).
        default_priority: retention priority (0..100) of a handle without
            ``metadata["priority"]``; lower priorities are selected first.
        clock: wall-clock seconds, the clock of ``KVHandle`` timestamps
            (``time.time``); tests inject their own.

    Raises:
        KVConfigError: unknown policy, bad ``ttl_seconds`` or ``default_priority``.
    """

    def __init__(
        self,
        policy: str | enum.Enum | EvictionStrategy | type[EvictionStrategy] = "lru",
        ttl_seconds: float | None = None,
        default_priority: int = DEFAULT_PRIORITY,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if ttl_seconds is not None and (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, int | float)
            or not ttl_seconds > 0
        ):
            raise KVConfigError(
                f"ttl_seconds must be a positive number or None, got {ttl_seconds!r}"
            )
        if (
            isinstance(default_priority, bool)
            or not isinstance(default_priority, int)
            or not MIN_PRIORITY <= default_priority <= MAX_PRIORITY
        ):
            raise KVConfigError(
                f"default_priority must be an int in {MIN_PRIORITY}..{MAX_PRIORITY}, "
                f"got {default_priority!r}"
            )
        self.strategy = _make_strategy(policy)
        self.ttl_seconds = ttl_seconds
        self.default_priority = default_priority
        self.clock = clock or time.time
        self.num_selections = 0
        self.num_selected_handles = 0
        self.num_selected_tokens = 0

    @property
    def policy(self) -> EvictionStrategy:
        """The strategy in use."""
        return self.strategy

    @property
    def policy_name(self) -> str:
        return self.strategy.name

    def set_policy(
        self, policy: str | enum.Enum | EvictionStrategy | type[EvictionStrategy]
    ) -> None:
        """Switch strategy (``"lru"``, ``"fifo"``, an enum or a strategy); KVConfigError if unknown."""
        self.strategy = _make_strategy(policy)

    def _priority(self, h: KVHandle) -> int:
        p = h.metadata.get("priority") if h.metadata else None
        if p is None:
            return self.default_priority
        if isinstance(p, bool) or not isinstance(p, int) or not MIN_PRIORITY <= p <= MAX_PRIORITY:
            raise KVInvalidInputError(
                f"handle {h.handle_id}: metadata['priority'] must be an int in "
                f"{MIN_PRIORITY}..{MAX_PRIORITY}, got {p!r}"
            )
        return p

    def order(self, handles: Iterable[KVHandle]) -> list[KVHandle]:
        """Every evictable handle of ``handles`` in selection order (see the module docstring)."""
        if isinstance(handles, KVHandle) or not isinstance(handles, Iterable):
            raise KVInvalidInputError(
                f"handles must be a list of KVHandle, got {type(handles).__name__}"
            )
        handles = list(handles)
        seen: set[str] = set()
        for h in handles:
            if not isinstance(h, KVHandle):
                raise KVInvalidInputError(
                    f"handles must be KVHandle objects, got {type(h).__name__}"
                )
            if h.handle_id in seen:
                raise KVInvalidInputError(f"handle {h.handle_id} is listed twice")
            seen.add(h.handle_id)
        candidates = [h for h in handles if h.ref_count <= 0 and h.pin_count <= 0]
        prio = {h.handle_id: self._priority(h) for h in candidates}
        ordered = self.strategy.order(candidates)
        if len(ordered) != len(candidates) or {h.handle_id for h in ordered} != {
            h.handle_id for h in candidates
        }:
            raise KVConfigError(
                f"strategy {self.strategy!r} did not return a permutation of its handles"
            )
        rank = {h.handle_id: i for i, h in enumerate(ordered)}
        if self.ttl_seconds is not None:
            deadline = self.clock() - self.ttl_seconds
            fresh = {h.handle_id for h in ordered if h.last_access_at >= deadline}
        else:
            fresh = {h.handle_id for h in ordered}
        # expired first (strategy order), then by priority, then strategy order
        return sorted(
            ordered,
            key=lambda h: (
                (1, prio[h.handle_id], rank[h.handle_id])
                if h.handle_id in fresh
                else (0, 0, rank[h.handle_id])
            ),
        )

    def select_victims(
        self,
        handles: Iterable[KVHandle],
        num_tokens_needed: int,
        max_victims: int | None = None,
    ) -> list[KVHandle]:
        """The handles to evict so that at least ``num_tokens_needed`` tokens are freed.

        Args:
            handles: candidate ``KVHandle`` objects; in-use (``ref_count > 0``)
                and pinned ones are skipped.
            num_tokens_needed: tokens to free (>= 0; 0 selects nothing).
            max_victims: select at most this many handles (None: no limit).

        Returns:
            The selected handles in eviction order; the shortest prefix of
            ``order(handles)`` whose ``num_tokens`` sum reaches the need.

        Raises:
            KVNoVictimError: the evictable handles (within ``max_victims``)
                cover fewer tokens than needed; nothing is selected.
            KVInvalidInputError: bad arguments (not handles, a handle listed twice,
                a negative count, a bad ``metadata['priority']``).
        """
        if not _is_count(num_tokens_needed):
            raise KVInvalidInputError(
                f"num_tokens_needed must be an int >= 0, got {num_tokens_needed!r}"
            )
        if max_victims is not None and not _is_count(max_victims):
            raise KVInvalidInputError(
                f"max_victims must be an int >= 0 or None, got {max_victims!r}"
            )
        num_tokens_needed = int(num_tokens_needed)
        if max_victims is not None:
            max_victims = int(max_victims)
        if not isinstance(handles, KVHandle) and isinstance(handles, Iterable):
            handles = list(handles)
        ordered = self.order(handles)
        if num_tokens_needed == 0:
            return []
        limit = len(ordered) if max_victims is None else min(max_victims, len(ordered))
        out: list[KVHandle] = []
        total = 0
        for h in ordered[:limit]:
            out.append(h)
            total += h.num_tokens
            if total >= num_tokens_needed:
                self.num_selections += 1
                self.num_selected_handles += len(out)
                self.num_selected_tokens += total
                return out
        err = KVNoVictimError
        if not ordered and any(h.pin_count > 0 for h in handles if h.ref_count <= 0):
            err = KVAllPinnedError
        raise err(
            f"need {num_tokens_needed} tokens but the {limit} evictable handles "
            f"considered hold only {total}",
            needed=num_tokens_needed,
            available=total,
        )

    def get_stats(self) -> dict:
        return {
            "policy": self.policy_name,
            "ttl_seconds": self.ttl_seconds,
            "default_priority": self.default_priority,
            "selections": self.num_selections,
            "selected_handles": self.num_selected_handles,
            "selected_tokens": self.num_selected_tokens,
        }

    def __repr__(self) -> str:
        return f"EvictionManager(policy={self.policy_name}, ttl_seconds={self.ttl_seconds})"
