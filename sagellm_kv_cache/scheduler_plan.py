"""The scheduler's plan types: ``SchedRequest`` in, ``SchedulerPlan`` of ``RequestPlan`` out.

Re-exported by ``sagellm_kv_cache.scheduler`` (see its docstring for what a plan means).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WAIT_REASONS", "RequestPlan", "SchedRequest", "SchedulerPlan"]

WAIT_REASONS = ("too_large", "no_blocks", "no_victims", "max_num_seqs", "token_budget", "blocked")


@dataclass(slots=True)
class SchedRequest:
    """A request as the scheduler sees it.

    Args:
        request_id: unique id.
        num_tokens: prompt tokens to hold KV for.
        tokens: token ids (hashed with the pool's hash) ...
        block_hashes: ... or precomputed hashes of its full blocks (trace replay).
    """

    request_id: str
    num_tokens: int
    tokens: Any = None
    block_hashes: Sequence[Hashable] | None = None


@dataclass(slots=True)
class RequestPlan:
    """One request's line of a ``SchedulerPlan``.

    Attributes:
        hit_blocks_per_tier: tier -> leading blocks found there (device first).
        blocks_to_allocate: new device blocks (onboarded + computed + partial);
            set for waiting requests too (what they would need now).
        blocks_to_onboard: blocks copied up from lower tiers (a subset of the above).
        blocks_to_evict: device blocks its allocation evicts (spilled down).
        evict_hashes: their hashes, in eviction order.
        reason: why it waits (``None`` when admitted).
    """

    request_id: str
    num_tokens: int
    num_blocks: int
    hit_blocks_per_tier: dict[str, int]
    block_size: int
    blocks_to_allocate: int = 0
    blocks_to_onboard: int = 0
    blocks_to_evict: int = 0
    evict_hashes: list = field(default_factory=list)
    admitted: bool = False
    reason: str | None = None

    @property
    def num_hit_blocks(self) -> int:
        return sum(self.hit_blocks_per_tier.values())

    @property
    def num_hit_tokens(self) -> int:
        return min(self.num_hit_blocks * self.block_size, self.num_tokens)

    @property
    def hit_tokens_per_tier(self) -> dict[str, int]:
        return {t: n * self.block_size for t, n in self.hit_blocks_per_tier.items()}

    @property
    def num_uncached_tokens(self) -> int:
        return self.num_tokens - self.num_hit_tokens


@dataclass(slots=True)
class SchedulerPlan:
    """What running ``requests`` now would take (see module docstring)."""

    requests: list[RequestPlan]
    device_free_blocks_after: int
    device_evictable_blocks_after: int

    @property
    def admitted(self) -> list[RequestPlan]:
        return [r for r in self.requests if r.admitted]

    @property
    def waiting(self) -> list[RequestPlan]:
        return [r for r in self.requests if not r.admitted]

    @property
    def admitted_ids(self) -> list[str]:
        return [r.request_id for r in self.requests if r.admitted]

    @property
    def wait_reasons(self) -> dict[str, str]:
        return {r.request_id: r.reason or "" for r in self.requests if not r.admitted}

    @property
    def blocks_to_allocate(self) -> int:
        return sum(r.blocks_to_allocate for r in self.requests if r.admitted)

    @property
    def blocks_to_onboard(self) -> int:
        return sum(r.blocks_to_onboard for r in self.requests if r.admitted)

    @property
    def blocks_to_evict(self) -> int:
        return sum(r.blocks_to_evict for r in self.requests if r.admitted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "admitted": self.admitted_ids,
            "waiting": self.wait_reasons,
            "blocks_to_allocate": self.blocks_to_allocate,
            "blocks_to_onboard": self.blocks_to_onboard,
            "blocks_to_evict": self.blocks_to_evict,
            "requests": [
                {
                    "request_id": r.request_id,
                    "admitted": r.admitted,
                    "reason": r.reason,
                    "hit_tokens_per_tier": r.hit_tokens_per_tier,
                    "blocks_to_allocate": r.blocks_to_allocate,
                    "blocks_to_onboard": r.blocks_to_onboard,
                    "blocks_to_evict": r.blocks_to_evict,
                }
                for r in self.requests
            ],
        }
