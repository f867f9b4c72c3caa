"""JSONL records decoded by msgspec typed structs: the fast path of the JSONL readers.

A line that decodes into its struct and passes the reader's checks becomes a
record straight away; any other line (bad JSON, a wrong type, a value out of
range, a bool where an int belongs) goes to the reader's field-by-field
parser, which raises the same ``KVTraceFormatError`` naming ``<file>:<line>``
and the field as before. So the fast path only ever accepts lines the
field-by-field parser accepts, with the same values (it is the reference).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from ._common import INT64_MAX, INT64_MIN, LineError

__all__ = ["BailianLine", "MooncakeLine", "decode_line", "ids_ok", "timestamp_ok"]

_INF = float("inf")
T = TypeVar("T")


class MooncakeLine(msgspec.Struct):
    """One Mooncake record (unknown keys ignored, as the field parser does)."""

    timestamp: int | float
    input_length: int
    output_length: int
    hash_ids: list[int]


class BailianLine(msgspec.Struct):
    """One Qwen-Bailian record (``type`` optional; null goes to the field parser)."""

    chat_id: int | str
    parent_chat_id: int | str
    timestamp: int | float
    input_length: int
    output_length: int
    turn: int
    hash_ids: list[int]
    type: str | msgspec.UnsetType = msgspec.UNSET


_DECODERS: dict[type, Any] = {}


def decode_line(raw: str | LineError, kind: type[T]) -> T | None:
    """``raw`` decoded as ``kind``, or None when it does not decode (the caller then
    runs its field parser for the error)."""
    if isinstance(raw, LineError):
        return None
    dec = _DECODERS.get(kind)
    if dec is None:
        dec = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        return dec.decode(raw)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return None


def timestamp_ok(ts: int | float, last_ts: float | None) -> bool:
    """A finite timestamp >= 0, not before the previous record's (an integer above
    2**53 is left to the field parser, which checks that it converts to a float)."""
    if not isinstance(ts, float) and ts > 2**53:
        return False
    return 0 <= ts < _INF and (last_ts is None or ts >= last_ts)


def ids_ok(ids: list[int], n_in: int, block_size: int) -> bool:
    """``ceil(n_in / block_size)`` ids, each a signed 64-bit integer."""
    if len(ids) != -(-n_in // block_size):
        return False
    return not ids or (min(ids) >= INT64_MIN and max(ids) <= INT64_MAX)
