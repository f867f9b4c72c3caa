"""Eviction policies behind one mechanism (see ``base.py`` for the interface)."""

from ..lazy import lazy_exports
from .arc import ARCPolicy
from .base import EvictionPolicy
from .fifo import FIFOPolicy
from .keyed import KeyedPolicy
from .leaf import LeafOnly
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .mru import MRUPolicy
from .predictive import PredictivePolicy
from .priority import PriorityPolicy
from .registry import POLICIES, EvictionPolicyName, list_policies, make_policy, register_policy
from .s3fifo import S3FIFOPolicy
from .slru import SLRUPolicy
from .ttl import TTLPolicy
from .workload_aware import WorkloadAwarePolicy

# the seed's handle-level EvictionManager is the seed's face (compat/), imported on first use
_SEED = ("EvictionManager", "EvictionStrategy", "FIFOEviction", "LRUEviction")
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_SEED, ".compat.eviction_manager"))

__all__ = [
    "POLICIES",
    "ARCPolicy",
    "EvictionManager",
    "EvictionPolicy",
    "EvictionPolicyName",
    "EvictionStrategy",
    "FIFOEviction",
    "FIFOPolicy",
    "KeyedPolicy",
    "LFUPolicy",
    "LRUEviction",
    "LRUPolicy",
    "LeafOnly",
    "MRUPolicy",
    "PredictivePolicy",
    "PriorityPolicy",
    "S3FIFOPolicy",
    "SLRUPolicy",
    "TTLPolicy",
    "WorkloadAwarePolicy",
    "list_policies",
    "make_policy",
    "register_policy",
]
