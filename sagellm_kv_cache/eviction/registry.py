"""Policies by name: ``make_policy("lru")``, ``list_policies()``."""

from __future__ import annotations

import enum
from collections.abc import Callable

from ..errors import KVConfigError
from .arc import ARCPolicy
from .base import EvictionPolicy
from .fifo import FIFOPolicy
from .leaf import LeafOnly
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .mru import MRUPolicy
from .predictive import PredictivePolicy
from .priority import PriorityPolicy
from .s3fifo import S3FIFOPolicy
from .slru import SLRUPolicy
from .ttl import TTLPolicy
from .workload_aware import WorkloadAwarePolicy

__all__ = ["POLICIES", "EvictionPolicyName", "list_policies", "make_policy", "register_policy"]

#: name -> policy class
POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}
POLICIES.update((c.name, c) for c in (S3FIFOPolicy, ARCPolicy, SLRUPolicy))
POLICIES.update((c.name, c) for c in (FIFOPolicy, MRUPolicy, LFUPolicy, PriorityPolicy, TTLPolicy))
POLICIES.update((c.name, c) for c in (PredictivePolicy, WorkloadAwarePolicy))


class EvictionPolicyName(enum.StrEnum):
    LRU = "lru"
    S3FIFO = "s3fifo"
    ARC = "arc"
    SLRU = "slru"
    FIFO = "fifo"
    MRU = "mru"
    LFU = "lfu"
    PRIORITY = "priority"
    TTL = "ttl"
    PREDICTIVE = "predictive"
    WORKLOAD_AWARE = "workload_aware"


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Class decorator: make ``cls`` selectable by ``cls.name``."""
    POLICIES[cls.name] = cls
    return cls


def make_policy(
    policy: str | EvictionPolicy | type[EvictionPolicy] | enum.Enum,
    clock: Callable[[], float] | None = None,
    **kwargs,
) -> EvictionPolicy:
    """A fresh policy instance from a name, enum, class or instance.

    ``"leaf:<name>"`` or ``leaf_only=True`` wraps the policy in ``LeafOnly``.
    """
    if kwargs.pop("leaf_only", False):
        return LeafOnly(make_policy(policy, clock, **kwargs))
    if isinstance(policy, str) and policy.lower().startswith("leaf:"):
        return LeafOnly(make_policy(policy[5:], clock, **kwargs))
    if isinstance(policy, EvictionPolicy):
        return policy
    if isinstance(policy, type) and issubclass(policy, EvictionPolicy):
        return policy(clock=clock, **kwargs)
    name = policy.value if isinstance(policy, enum.Enum) else policy
    if isinstance(name, str):
        name = name.lower().replace("-", "").replace("_", "")
        aliases = {p.replace("_", ""): p for p in POLICIES}
        cls = POLICIES.get(aliases.get(name, ""))
        if cls is not None:
            return cls(clock=clock, **kwargs)
    raise KVConfigError(f"unknown eviction policy {policy!r}; choose one of {sorted(POLICIES)}")


def list_policies() -> dict[str, str]:
    """name -> one-line description, for ``--help`` and docs."""
    return {name: cls.description for name, cls in sorted(POLICIES.items())}
