"""``KVCacheManager``: the KV-cache facade an engine holds, request ids over the tiered cache.

::

    engine:  allocate(request_id, tokens=...) -> OffloadAllocation (wait() before running it)
             cache(request_id) / free(request_id)
                 |
    KVCacheManager   request id -> allocation; checks every argument before acting
                 |
    KVOffloadManager (device pool + host / disk tiers)      offload/

``SchedulerBridge`` (``scheduler.py``) plans batches over it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from .compat.cache_manager import CacheManagerSeedMixin
from .errors import KVCacheMissError, KVInvalidInputError
from .handle import KVHandle
from .offload import KVOffloadManager, OffloadAllocation, OffloadLookup
from .pool import KVPool
from .scheduler_checks import (
    as_int,
    check_hashes,
    check_prompt,
    check_request_id,
    check_timeout,
    sequence_len,
)

__all__ = ["KVCacheManager"]


class KVCacheManager(CacheManagerSeedMixin):
    """The single KV-cache facade an engine holds: request ids over the tiered cache.

    Args:
        offload: the ``KVOffloadManager`` (device pool + lower tiers) to drive.
    """

    def __init__(self, offload: KVOffloadManager) -> None:
        self.offload = offload
        #: the device pool (``write_kv`` / ``read_kv`` on a request's handle)
        self.pool: KVPool = offload.device
        self.block_size: int = offload.block_size
        self._requests: dict[str, OffloadAllocation] = {}

    def block_hashes_of(self, tokens: Any = None, block_hashes: Any = None) -> list | None:
        if tokens is not None:
            sequence_len(tokens, "tokens")
            return self.pool.compute_block_hashes(tokens)
        return None if block_hashes is None else check_hashes(block_hashes)

    def lookup(self, tokens: Any = None, *, block_hashes: Any = None) -> OffloadLookup:
        """Where the cached prefix of a prompt lives (no side effect)."""
        if tokens is not None and block_hashes is not None:
            raise KVInvalidInputError("give tokens or block_hashes, not both")
        hashes = self.block_hashes_of(tokens, block_hashes)
        if hashes is None:
            raise KVInvalidInputError("lookup needs tokens or block_hashes")
        return self.offload.lookup(hashes)

    def allocate(
        self,
        request_id: str,
        num_tokens: int | None = None,
        *,
        tokens: Any = None,
        block_hashes: Sequence[Hashable] | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> OffloadAllocation:
        """Allocate KV for a request (prefix reuse across tiers when hashes or tokens are given).

        Raises:
            KVInvalidTypeError / KVInvalidInputError: a bad argument (a non-str id,
                a generator or set of tokens, unhashable or ``None`` hashes,
                ``num_tokens`` that disagrees with ``tokens``, a bad ``timeout``),
                or ``request_id`` already holds an allocation. Nothing changed.
            KVBudgetExceededError: it does not fit the device now (nothing changed).
        """
        check_request_id(request_id)
        if request_id in self._requests:
            raise KVInvalidInputError(f"request {request_id!r} already holds KV blocks")
        num_tokens, block_hashes = check_prompt(num_tokens, tokens, block_hashes)
        check_timeout(timeout)
        alloc = self.offload.allocate(
            tokens, block_hashes=block_hashes, num_tokens=num_tokens, request_id=request_id
        )
        self._requests[request_id] = alloc
        if wait:
            alloc.wait(timeout)
        return alloc

    def get_allocation(self, request_id: str) -> OffloadAllocation:
        check_request_id(request_id)
        try:
            return self._requests[request_id]
        except KeyError:
            raise KVCacheMissError(f"no allocation for request {request_id!r}") from None

    def get_handle(self, request_id: str) -> KVHandle:
        return self.get_allocation(request_id).handle

    def cache(self, request_id: str, num_tokens: int | None = None) -> int:
        """Register the request's computed full blocks (their KV is written)."""
        handle = self.get_handle(request_id)
        kwargs = {}
        if num_tokens is not None:
            kwargs["num_tokens"] = n = as_int(num_tokens, "num_tokens")
            if not 0 <= n <= handle.num_tokens:
                raise KVInvalidInputError(f"num_tokens={n} outside [0, {handle.num_tokens}]")
        return self.offload.cache_blocks(handle, **kwargs)

    def free(self, request_id: str, *, cache: bool = True) -> None:
        """Release a request; with ``cache`` its full blocks are registered first."""
        alloc = self.get_allocation(request_id)
        if cache and alloc.handle.block_hashes:
            self.offload.cache_blocks(alloc.handle)
        self.offload.free(alloc.handle)
        del self._requests[request_id]

    @property
    def running(self) -> list[str]:
        return list(self._requests)

    def is_running(self, request_id: str) -> bool:
        """Whether ``request_id`` holds an allocation now."""
        return request_id in self._requests

    @property
    def allocations(self) -> Mapping[str, OffloadAllocation]:
        """Request id -> allocation of the running requests (a read-only view)."""
        return MappingProxyType(self._requests)

    def get_stats(self) -> dict[str, Any]:
        out = self.offload.get_stats()
        out["device_pool"] = self.pool.get_stats()
        out["running_requests"] = len(self._requests)
        return out

    def reset(self) -> None:
        self._requests.clear()
        self.offload.reset()

    def close(self) -> None:
        self.offload.close()

    def check_invariants(self) -> None:
        self.offload.check_invariants()
