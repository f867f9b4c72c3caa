"""Argument checks of the scheduler facade (``scheduler.py``).

Cheap by design: types, lengths and one C-level pass where a list must be
scanned (hashability, ``None``); no per-token Python work. Each raises the
typed error (``KVInvalidTypeError`` for a wrong type, ``KVInvalidInputError``
for a wrong value, ``KVConfigError`` for a bad limit) before anything changes.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Set
from typing import Any

from .errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError
from .pool import check_num_tokens

__all__ = [
    "as_int",
    "check_hashes",
    "check_limit",
    "check_prompt",
    "check_request_batch",
    "check_request_id",
    "check_timeout",
    "request_fields",
    "sequence_len",
]

#: the fields a request mapping may name (``SchedRequest``'s)
REQUEST_FIELDS = ("request_id", "num_tokens", "tokens", "block_hashes")


def as_int(value: Any, name: str) -> int:
    """``value`` as an int: ints and numpy integers pass, bools, floats and the rest do not."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)  # numpy integers
    raise KVInvalidTypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")


def check_request_id(request_id: Any) -> str:
    if not isinstance(request_id, str):
        raise KVInvalidTypeError(f"request_id must be a str, got {type(request_id).__name__}")
    return request_id


def sequence_len(value: Any, name: str) -> int:
    """``len(value)`` of a sized, indexable sequence (list, tuple, numpy array, tensor);
    generators, sets, mappings and strings are refused."""
    if (
        isinstance(value, str | bytes | bytearray | Mapping | Set)
        or not hasattr(value, "__getitem__")
        or not hasattr(value, "__len__")
    ):
        raise KVInvalidTypeError(f"{name} must be a sequence, got {type(value).__name__}")
    try:
        return len(value)
    except TypeError:  # a 0-d array or tensor
        raise KVInvalidTypeError(f"{name} must be a sequence, got a scalar") from None


def check_hashes(block_hashes: Any) -> list:
    """A list copy of ``block_hashes``: a sequence of hashable, non-None hashes."""
    sequence_len(block_hashes, "block_hashes")
    hashes = list(block_hashes)
    try:
        hash(tuple(hashes))  # one C-level pass over every element
    except TypeError as err:
        raise KVInvalidTypeError(f"block_hashes must be hashable: {err}") from None
    if None in hashes:
        raise KVInvalidInputError(f"block hash {hashes.index(None)} is None")
    return hashes


def check_prompt(num_tokens: Any, tokens: Any, block_hashes: Any) -> tuple[int, list | None]:
    """``(num_tokens, block_hashes)`` checked: ``num_tokens`` defaults to ``len(tokens)``
    and must equal it when both are given."""
    if tokens is not None:
        if block_hashes is not None:
            raise KVInvalidInputError("give tokens or block_hashes, not both")
        n = sequence_len(tokens, "tokens")
        if num_tokens is None:
            num_tokens = n
        elif as_int(num_tokens, "num_tokens") != n:
            raise KVInvalidInputError(f"num_tokens={num_tokens} but {n} tokens given")
    if num_tokens is None:
        raise KVInvalidInputError("a request needs num_tokens or tokens")
    num_tokens = check_num_tokens(as_int(num_tokens, "num_tokens"))
    return num_tokens, None if block_hashes is None else check_hashes(block_hashes)


def check_timeout(timeout: Any) -> None:
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or timeout < 0
    ):
        raise KVInvalidTypeError(f"timeout must be None or seconds >= 0, got {timeout!r}")


def check_limit(name: str, value: Any) -> int | None:
    """A scheduler limit: ``None`` or an int >= 1 (numpy integers too)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise KVConfigError(f"{name} must be None or an int >= 1, got {value!r}")
    return int(value)


def request_fields(r: Mapping) -> tuple:
    """``(request_id, num_tokens, tokens, block_hashes)`` of a request mapping."""
    unknown = set(r) - set(REQUEST_FIELDS)
    if unknown:
        raise KVInvalidInputError(
            f"unknown request field(s) {sorted(map(str, unknown))}; known: {list(REQUEST_FIELDS)}"
        )
    if "request_id" not in r:
        raise KVInvalidInputError("a request needs a request_id")
    return tuple(r.get(f) for f in REQUEST_FIELDS)


def check_request_batch(request_ids: Iterable[str], running: Mapping) -> None:
    """Ids of one plan / schedule call: distinct, and none already holding blocks."""
    seen: set[str] = set()
    for rid in request_ids:
        if rid in seen:
            raise KVInvalidInputError(f"request {rid!r} is listed twice")
        if rid in running:
            raise KVInvalidInputError(f"request {rid!r} already holds KV blocks")
        seen.add(rid)
