"""Eviction policies behind one mechanism (see ``base.py`` for the interface)."""

from .base import EvictionPolicy
from .lru import LRUPolicy
from .registry import POLICIES, EvictionPolicyName, list_policies, make_policy, register_policy

__all__ = [
    "POLICIES",
    "EvictionPolicy",
    "EvictionPolicyName",
    "LRUPolicy",
    "list_policies",
    "make_policy",
    "register_policy",
]
