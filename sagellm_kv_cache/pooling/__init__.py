"""Distributed KV pooling: several nodes' pools as one global pool.

* ``GlobalKVPoolManager`` / ``NodeContribution`` (``manager.py``): nodes'
  contributions, global alloc/free/get, rebalance, stats, and the directory
  of which node caches which block (``directory.py``).
* ``RemoteKVAccessor`` (``remote.py``): fetch a prefix cached on another node
  through ``KVTransferEngine`` (in-process or across processes).
* ``KVTransferPipeline`` (``pipeline.py``): bounded async transfers.
"""

from __future__ import annotations

from .directory import BlockDirectory, DirectoryHook
from .manager import GlobalKVPoolManager, NodeContribution
from .pipeline import KVTransferPipeline
from .remote import FetchResult, RemoteKVAccessor

__all__ = [
    "BlockDirectory",
    "DirectoryHook",
    "FetchResult",
    "GlobalKVPoolManager",
    "KVTransferPipeline",
    "NodeContribution",
    "RemoteKVAccessor",
]
