"""Typed errors of sagellm-kv-cache.

Every error carries a stable ``code`` (a short upper-case string that never
changes between releases) so callers, logs and metrics can match on it without
parsing messages. Errors that are also caller mistakes subclass the matching
builtin too, so ``except ValueError`` keeps working::

    KVCacheError                      KV_ERROR
    +-- KVBudgetExceededError         KV_BUDGET_EXCEEDED     (also MemoryError)
    |   +-- KVPoolFullError           KV_POOL_FULL
    |   +-- KVMemoryExhaustedError    KV_MEMORY_EXHAUSTED
    +-- KVInvalidHandleError          KV_INVALID_HANDLE      (also ValueError)
    |   +-- KVDoubleFreeError         KV_DOUBLE_FREE
    |   +-- KVHandleNotFoundError     KV_HANDLE_NOT_FOUND    (also KeyError)
    +-- KVHandlePinnedError           KV_HANDLE_PINNED
    +-- KVRefCountUnderflowError      KV_REFCOUNT_UNDERFLOW
    +-- KVCacheMissError              KV_CACHE_MISS          (also KeyError)
    +-- KVPrefixTooLongError          KV_PREFIX_TOO_LONG     (also ValueError)
    +-- KVNoVictimError               KV_NO_VICTIM
    |   +-- KVAllPinnedError          KV_ALL_PINNED
    +-- KVEvictionFailedError         KV_EVICTION_FAILED
    +-- KVBlockImmutableError         KV_BLOCK_IMMUTABLE     (also ValueError)
    +-- KVStorageError                KV_STORAGE_ERROR       (also OSError)
    |   +-- KVStorageLockedError      KV_STORAGE_LOCKED
    +-- KVTransferFailedError         KV_TRANSFER_FAILED
    |   +-- KVTransferTimeoutError    KV_TRANSFER_TIMEOUT    (also TimeoutError)
    |   +-- KVChecksumMismatchError   KV_CHECKSUM_MISMATCH
    |   +-- KVMetadataMismatchError   KV_METADATA_MISMATCH
    +-- KVConfigError                 KV_CONFIG_INVALID      (also ValueError)
    |   +-- KVConfigInvalidError      KV_CONFIG_INVALID      (seed name, same class role)
    |   +-- KVConfigMissingError      KV_CONFIG_MISSING
    +-- KVNotImplementedError         KV_NOT_IMPLEMENTED     (also NotImplementedError)
    +-- KVInvalidInputError           KV_INVALID_INPUT       (also ValueError)
    +-- KVInvalidTypeError            KV_INVALID_TYPE        (also TypeError)
    +-- KVTraceFormatError            KV_TRACE_FORMAT        (also ValueError)
    +-- KVEventGapError               KV_EVENT_GAP

The seed package's names (``KVMemoryExhaustedError``, ``KVHandleNotFoundError``,
``KVEvictionFailedError``, ``KVAllPinnedError``, ``KVMetadataMismatchError``,
``KVConfigMissingError``, ``KVConfigInvalidError``, ``KVNotImplementedError``)
sit in this tree with codes of their own (``KVConfigInvalidError`` shares
``KV_CONFIG_INVALID`` with its parent ``KVConfigError``: it is the seed's
spelling of the same error, so ``ERROR_CODES`` maps that code to the parent).
``is_retryable()`` is True for transient failures only: transfer failures
(timeouts, checksum mismatches, not metadata mismatches), a full budget or
pool (space may free up), no victim now, storage lock contention.
"""

from __future__ import annotations

__all__ = [
    "ERROR_CODES",
    "KVAllPinnedError",
    "KVBlockImmutableError",
    "KVBudgetExceededError",
    "KVCacheError",
    "KVCacheMissError",
    "KVChecksumMismatchError",
    "KVConfigError",
    "KVConfigInvalidError",
    "KVConfigMissingError",
    "KVDoubleFreeError",
    "KVEventGapError",
    "KVEvictionFailedError",
    "KVHandleNotFoundError",
    "KVHandlePinnedError",
    "KVInvalidHandleError",
    "KVInvalidInputError",
    "KVInvalidTypeError",
    "KVMemoryExhaustedError",
    "KVMetadataMismatchError",
    "KVNoVictimError",
    "KVNotImplementedError",
    "KVPoolFullError",
    "KVPrefixTooLongError",
    "KVRefCountUnderflowError",
    "KVStorageError",
    "KVStorageLockedError",
    "KVTraceFormatError",
    "KVTransferFailedError",
    "KVTransferTimeoutError",
]


class KVCacheError(Exception):
    """Base class of every error this package raises on purpose."""

    code: str = "KV_ERROR"
    #: whether retrying the same call later may succeed (see ``is_retryable``)
    retryable: bool = False

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return f"[{self.code}] {self.message}"

    def is_retryable(self) -> bool:
        """Seed API: may the same call succeed if retried later (a transient failure)?"""
        return self.retryable

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "details": dict(self.details)}


class KVBudgetExceededError(KVCacheError, MemoryError):
    """The request needs more blocks than the budget can give, even after eviction."""

    code = "KV_BUDGET_EXCEEDED"
    retryable = True


class KVPoolFullError(KVBudgetExceededError):
    """No free or evictable block is left in the pool."""

    code = "KV_POOL_FULL"


class KVMemoryExhaustedError(KVBudgetExceededError):
    """Seed name: the memory backing the pool (device or host) is exhausted."""

    code = "KV_MEMORY_EXHAUSTED"


class KVInvalidHandleError(KVCacheError, ValueError):
    """The handle is unknown to this pool (never allocated here, or from another pool)."""

    code = "KV_INVALID_HANDLE"


class KVDoubleFreeError(KVInvalidHandleError):
    """The handle was already freed."""

    code = "KV_DOUBLE_FREE"


class KVHandleNotFoundError(KVInvalidHandleError, KeyError):
    """Seed name: no handle with this id is registered (e.g. with an offload manager)."""

    code = "KV_HANDLE_NOT_FOUND"


class KVHandlePinnedError(KVCacheError):
    """The handle is pinned; unpin it before freeing it."""

    code = "KV_HANDLE_PINNED"


class KVRefCountUnderflowError(KVCacheError):
    """A reference or pin count would drop below zero."""

    code = "KV_REFCOUNT_UNDERFLOW"


class KVCacheMissError(KVCacheError, KeyError):
    """A block hash or handle id is not in the cache."""

    code = "KV_CACHE_MISS"


class KVPrefixTooLongError(KVCacheError, ValueError):
    """A prefix is longer than the cache can ever hold."""

    code = "KV_PREFIX_TOO_LONG"


class KVNoVictimError(KVCacheError):
    """Eviction was asked for but every candidate is in use or pinned."""

    code = "KV_NO_VICTIM"
    retryable = True


class KVAllPinnedError(KVNoVictimError):
    """Seed name: no victim because every candidate is pinned."""

    code = "KV_ALL_PINNED"


class KVEvictionFailedError(KVCacheError):
    """Seed name: an eviction was chosen but could not be carried out."""

    code = "KV_EVICTION_FAILED"


class KVBlockImmutableError(KVCacheError, ValueError):
    """A write (``write_kv``, ``copy_blocks``) targets a block that is cached
    (hashed, possibly shared by other requests) or otherwise not writable by
    this caller; a cached block's KV never changes. ``details["block_ids"]``
    names the refused blocks."""

    code = "KV_BLOCK_IMMUTABLE"


class KVStorageError(KVCacheError, OSError):
    """A storage tier (disk) failed to read or write a block: missing or
    unreadable file, disk full, I/O error. ``__cause__`` is the OS error."""

    code = "KV_STORAGE_ERROR"


class KVStorageLockedError(KVStorageError):
    """Another store owns the directory (or this store lost its lock)."""

    code = "KV_STORAGE_LOCKED"
    retryable = True


class KVTransferFailedError(KVCacheError):
    """A KV transfer did not complete; nothing of it is visible on the receiver."""

    code = "KV_TRANSFER_FAILED"
    retryable = True


class KVTransferTimeoutError(KVTransferFailedError, TimeoutError):
    """A KV transfer did not complete within its timeout."""

    code = "KV_TRANSFER_TIMEOUT"


class KVChecksumMismatchError(KVTransferFailedError):
    """Received KV bytes do not match the checksum sent with them."""

    code = "KV_CHECKSUM_MISMATCH"


class KVMetadataMismatchError(KVTransferFailedError):
    """Seed name: received KV metadata (shape, dtype, layout, token count) disagrees
    with the receiver's; retrying the same transfer cannot help."""

    code = "KV_METADATA_MISMATCH"
    retryable = False


class KVConfigError(KVCacheError, ValueError):
    """A configuration value is invalid (unknown device, dtype, policy, bad size...)."""

    code = "KV_CONFIG_INVALID"


class KVConfigInvalidError(KVConfigError):
    """Seed name of ``KVConfigError`` (same code)."""


class KVConfigMissingError(KVConfigError):
    """Seed name: a required configuration value is absent."""

    code = "KV_CONFIG_MISSING"


class KVNotImplementedError(KVCacheError, NotImplementedError):
    """Seed name: the operation is not available in this build or configuration."""

    code = "KV_NOT_IMPLEMENTED"


class KVInvalidInputError(KVCacheError, ValueError):
    """An argument has the right type but a wrong value (zero/negative tokens, length mismatch)."""

    code = "KV_INVALID_INPUT"


class KVInvalidTypeError(KVCacheError, TypeError):
    """An argument has the wrong type (e.g. a float token count, a str token)."""

    code = "KV_INVALID_TYPE"


class KVTraceFormatError(KVCacheError, ValueError):
    """A trace record is malformed; the message names file, line and field."""

    code = "KV_TRACE_FORMAT"


class KVEventGapError(KVCacheError):
    """Events a consumer has not seen are gone (ring buffer overflow, or a hole
    in a replayed sequence); it must resynchronise from a full snapshot."""

    code = "KV_EVENT_GAP"


def _all_error_classes() -> list[type[KVCacheError]]:
    out: list[type[KVCacheError]] = []
    todo: list[type[KVCacheError]] = [KVCacheError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


#: code -> error class, for clients that receive a code over the wire.
ERROR_CODES: dict[str, type[KVCacheError]] = {
    c.code: c for c in _all_error_classes() if c is not KVConfigInvalidError
}
