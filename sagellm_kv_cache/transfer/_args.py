"""Checks of the arguments callers pass to ``KVTransferEngine`` (typed errors,
raised before anything is recorded, allocated or sent)."""

from __future__ import annotations

from typing import Any

from ..errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError

__all__ = ["check_count", "check_handles", "check_number", "check_pool", "check_rank"]


def check_rank(name: str, value: Any) -> int:
    """A rank is an int >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KVInvalidTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise KVInvalidInputError(f"{name} must be >= 0, got {value}")
    return value


def check_handles(handles: Any) -> list:
    """A list or tuple of handles (a generator would be consumed by a failed attempt)."""
    if not isinstance(handles, list | tuple):
        raise KVInvalidTypeError(
            f"handles must be a list or tuple of KVHandle, got {type(handles).__name__}"
        )
    return list(handles)


def check_pool(pool: Any) -> None:
    from ..pool import KVPool

    if not isinstance(pool, KVPool):
        raise KVInvalidTypeError(f"expected a KVPool, got {type(pool).__name__}")


def check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> None:
    """An int or float (not a bool) >= ``minimum`` (> when ``strict``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise KVConfigError(f"{name} must be a number {bound}, got {value!r}")


def check_count(name: str, value: Any) -> None:
    """A positive int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KVConfigError(f"{name} must be a positive int, got {value!r}")
