"""Argument checks shared by the pool layers: counts, block ids, pool sizes, token counts
and request metadata. Each returns the value in canonical form or raises a typed error
(``KVInvalidTypeError`` for a wrong type, ``KVInvalidInputError`` for a bad value,
``KVConfigError`` for a pool that cannot be built) before anything is changed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from numbers import Integral
from typing import Any

from .errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError

__all__ = [
    "BOOKKEEPING_BYTES_PER_BLOCK",
    "MAX_NUM_BLOCKS",
    "check_block_ids",
    "check_count",
    "check_metadata",
    "check_num_blocks",
    "check_num_tokens",
]

#: the largest pool: 2**32 blocks (68.7 billion tokens at block size 16)
MAX_NUM_BLOCKS = 1 << 32
#: host bytes of bookkeeping per block (ref, pin, hash, parent lists, free queue, policy)
BOOKKEEPING_BYTES_PER_BLOCK = 96

_INT_ONLY = frozenset((int,))


def check_count(value: Any, name: str, minimum: int = 0) -> int:
    """An int (not a bool) ``>= minimum``, or a typed error."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise KVInvalidTypeError(
                f"{name} must be an int, got {type(value).__name__} ({value!r:.40})"
            )
        value = int(value)
    if value < minimum:
        raise KVInvalidInputError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_block_ids(block_ids: Any, num_blocks: int, name: str = "block_ids") -> list[int]:
    """``block_ids`` as a list of ints in ``[0, num_blocks)`` (numpy ints too, bools not),
    or ``KVInvalidTypeError`` / ``KVInvalidInputError``; C-level passes for a list of ints."""
    if type(block_ids) is not list:
        if isinstance(block_ids, str | bytes | set | frozenset | dict) or not hasattr(
            block_ids, "__len__"
        ):
            raise KVInvalidTypeError(
                f"{name} must be a list of block ids, got {type(block_ids).__name__}"
            )
        block_ids = list(block_ids)
    if not block_ids:
        return block_ids
    if not set(map(type, block_ids)) <= _INT_ONLY:
        for b in block_ids:
            if isinstance(b, bool) or not isinstance(b, Integral):
                raise KVInvalidTypeError(
                    f"{name}: block id {b!r:.40} is a {type(b).__name__}, not an int"
                )
        block_ids = [int(b) for b in block_ids]
    lo, hi = min(block_ids), max(block_ids)
    if lo < 0 or hi >= num_blocks:
        raise KVInvalidInputError(
            f"{name}: block id {lo if lo < 0 else hi} out of range [0, {num_blocks})"
        )
    return block_ids


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return None


def check_num_blocks(num_blocks: Any) -> int:
    """A pool size in blocks: an int in ``[1, MAX_NUM_BLOCKS]`` whose bookkeeping fits
    the host's physical memory (``KVConfigError`` otherwise, before allocating)."""
    n = check_count(num_blocks, "num_blocks", 1)
    if n > MAX_NUM_BLOCKS:
        raise KVConfigError(
            f"num_blocks={n} is above the maximum of {MAX_NUM_BLOCKS} blocks per pool"
        )
    need = n * BOOKKEEPING_BYTES_PER_BLOCK
    have = _physical_memory_bytes()
    if have is not None and need > have:
        raise KVConfigError(
            f"num_blocks={n} needs about {need / 2**30:.1f} GiB of bookkeeping "
            f"({BOOKKEEPING_BYTES_PER_BLOCK} B per block); this host has "
            f"{have / 2**30:.1f} GiB of memory"
        )
    return n


def check_num_tokens(num_tokens: Any, name: str = "num_tokens") -> int:
    """A positive int (numpy ints too), or a typed error (bools and floats are refused,
    not rounded)."""
    if type(num_tokens) is not int or num_tokens <= 0:
        num_tokens = check_count(num_tokens, name)
        if num_tokens <= 0:
            raise KVInvalidInputError(f"{name} must be positive, got {num_tokens}")
    return num_tokens


def check_metadata(metadata: Any, request_id: Any = None) -> None:
    """``metadata`` a mapping or ``None``; ``request_id`` a str, an int or ``None``."""
    if metadata is not None and not isinstance(metadata, Mapping):
        raise KVInvalidTypeError(
            f"metadata must be a dict or None, got {type(metadata).__name__} ({metadata!r:.40})"
        )
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, str | int)
    ):
        raise KVInvalidTypeError(
            f"request_id must be a str, an int or None, got {type(request_id).__name__}"
        )
