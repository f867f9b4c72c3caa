"""What ``KVOffloadManager`` returns: where a prefix lives, an allocation, its job's result."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..handle import KVHandle

__all__ = ["OffloadAllocation", "OffloadLookup", "OnboardResult"]


@dataclass(slots=True)
class OffloadLookup:
    """Where the cached prefix of a request lives.

    Attributes:
        num_hit_blocks: length of the leading run of blocks held by some tier.
        tiers: tier name of each hit block (the first tier holding it, top down).
        hits_per_tier: tier name -> hit blocks (every tier present, zeros included).
        num_blocks: full blocks of the request.
        block_size: tokens per block.
        device_tier: name of the device tier.
    """

    num_hit_blocks: int
    tiers: list[str]
    hits_per_tier: dict[str, int]
    num_blocks: int
    block_size: int
    device_tier: str = "device"

    @property
    def num_hit_tokens(self) -> int:
        return self.num_hit_blocks * self.block_size

    @property
    def hit_tokens_per_tier(self) -> dict[str, int]:
        return {t: n * self.block_size for t, n in self.hits_per_tier.items()}

    @property
    def num_device_hit_blocks(self) -> int:
        """Leading blocks already on the device (no copy needed)."""
        n = 0
        for t in self.tiers:
            if t != self.device_tier:
                break
            n += 1
        return n


@dataclass(slots=True)
class OnboardResult:
    """What one allocation's job moved (the value of its future).

    Attributes:
        blocks_onboarded: source tier -> blocks copied up and verified.
        bytes_onboarded: source tier -> bytes planned to move up.
        blocks_spilled: device victims written to a lower tier.
        elapsed_s: time the job ran.
        blocks_failed: source tier -> hit blocks not onboarded (a failed read
            or copy, or after one): misses, the engine computes them.
        errors: the typed errors (``KVChecksumMismatchError``,
            ``KVStorageError``) of the blocks that failed.
    """

    blocks_onboarded: dict[str, int]
    bytes_onboarded: dict[str, int]
    blocks_spilled: int
    elapsed_s: float
    blocks_failed: dict[str, int] = field(default_factory=dict)
    errors: list = field(default_factory=list)


@dataclass(slots=True)
class OffloadAllocation:
    """A device allocation with its cached prefix onboarded (or on its way).

    Attributes:
        handle: the device pool's handle; ``handle.num_cached_tokens`` counts
            every hit token (device and onboarded); after the wait it counts
            the verified ones (lower when an onboarding failed): compute
            from there.
        lookup: the tier of each hit block at allocation time.
        future: resolves to an ``OnboardResult`` once the bytes are in place;
            wait for it before running the request.
        evicted_hashes: device blocks this allocation evicted (spilled or dropped).
    """

    handle: KVHandle
    lookup: OffloadLookup
    future: Future
    evicted_hashes: list = field(default_factory=list)
    manager: Any = field(default=None, repr=False, compare=False)

    @property
    def num_hit_tokens(self) -> int:
        return self.lookup.num_hit_tokens

    def wait(self, timeout: float | None = None) -> OnboardResult:
        """The job's result once its bytes are in place; the verified blocks are hittable then."""
        result = self.future.result(timeout)
        if self.manager is not None:
            self.manager.settle()
        return result
