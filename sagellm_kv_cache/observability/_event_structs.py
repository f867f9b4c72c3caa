"""msgspec typed structs of the KV-event JSON lines: the fast path of ``events_from_jsonl``.

Imported only when msgspec is installed. :func:`decode_line` returns the
event, or None for any line the structs or the checks here do not accept;
the caller then runs the field parser (``event_json.event_from_dict``), which
raises the field-named error. Every check the field parser makes is made
here too (an int that is not a bool, hex hashes, as many ids as hashes, no
null hash), so both paths accept the same lines with the same values.
"""

from __future__ import annotations

import msgspec

from .event_types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["decode_line"]


class _Stored(msgspec.Struct, tag="block_stored", tag_field="type"):
    seq: int
    ts: int | float
    block_hashes: list[str | int]
    block_ids: list[int]
    parent_block_hash: str | int | None = None
    block_size: int | None = None


class _Removed(msgspec.Struct, tag="block_removed", tag_field="type"):
    seq: int
    ts: int | float
    block_hashes: list[str | int]
    block_ids: list[int]
    reason: str


class _Cleared(msgspec.Struct, tag="all_blocks_cleared", tag_field="type"):
    seq: int
    ts: int | float


_DECODER = msgspec.json.Decoder(_Stored | _Removed | _Cleared)


def _hash(v: str | int) -> bytes | int:
    return bytes.fromhex(v) if isinstance(v, str) else v


def decode_line(line: str) -> KVEvent | None:
    """The event of one JSON line, or None (the field parser then gives the error)."""
    try:
        e = _DECODER.decode(line)
        if isinstance(e, _Cleared):
            return AllBlocksCleared(e.seq, float(e.ts))
        if len(e.block_ids) != len(e.block_hashes):
            return None
        hashes = tuple(map(_hash, e.block_hashes))
        if isinstance(e, _Stored):
            parent = None if e.parent_block_hash is None else _hash(e.parent_block_hash)
            return BlockStored(e.seq, float(e.ts), hashes, parent, tuple(e.block_ids), e.block_size)
        return BlockRemoved(e.seq, float(e.ts), hashes, tuple(e.block_ids), e.reason)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
