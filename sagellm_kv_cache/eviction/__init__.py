"""Eviction policies behind one mechanism (see ``base.py`` for the interface)."""

from .arc import ARCPolicy
from .base import EvictionPolicy
from .leaf import LeafOnly
from .lru import LRUPolicy
from .registry import POLICIES, EvictionPolicyName, list_policies, make_policy, register_policy
from .s3fifo import S3FIFOPolicy
from .slru import SLRUPolicy

__all__ = [
    "POLICIES",
    "ARCPolicy",
    "EvictionPolicy",
    "EvictionPolicyName",
    "LRUPolicy",
    "LeafOnly",
    "S3FIFOPolicy",
    "SLRUPolicy",
    "list_policies",
    "make_policy",
    "register_policy",
]
