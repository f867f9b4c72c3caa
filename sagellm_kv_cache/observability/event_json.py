"""KV events as JSON lines: bytes hashes as hex strings, int hashes (trace ids) as ints.

Nothing read is evaluated. Decoding has two paths with one set of rules:
``event_from_dict`` checks a parsed object field by field and raises
``KVInvalidInputError`` naming the field; with msgspec installed (the
``[events]`` extra) ``events_from_jsonl`` first decodes each line into a
typed struct, and any line that does not decode (bad JSON, a wrong type, a
hash that is not hex, lengths that disagree) goes to the field parser, which
raises the error it always did. So the fast path only accepts lines the field
parser accepts, with the same values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..errors import KVInvalidInputError, KVInvalidTypeError
from .event_types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["event_from_dict", "event_to_dict", "events_from_jsonl", "events_to_jsonl"]


def _enc_hash(h: Any) -> Any:
    if isinstance(h, bytes):
        return h.hex()
    if isinstance(h, int) and not isinstance(h, bool):
        return h
    if h is None:
        return None
    raise KVInvalidTypeError(f"block hash of type {type(h).__name__} has no JSON encoding")


def _dec_hash(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return bytes.fromhex(v)
        except ValueError:
            raise KVInvalidInputError(f"block hash {v!r} is not hex") from None
    if (isinstance(v, int) and not isinstance(v, bool)) or v is None:
        return v
    raise KVInvalidInputError(f"block hash {v!r} is neither a hex string nor an int")


def event_to_dict(event: KVEvent) -> dict[str, Any]:
    """JSON-ready dict of an event (bytes hashes as hex)."""
    d: dict[str, Any] = {"type": event.type, "seq": event.seq, "ts": event.timestamp}
    if isinstance(event, BlockStored):
        d["block_hashes"] = [_enc_hash(h) for h in event.block_hashes]
        d["parent_block_hash"] = _enc_hash(event.parent_block_hash)
        d["block_ids"] = list(event.block_ids)
        d["block_size"] = event.block_size
    elif isinstance(event, BlockRemoved):
        d["block_hashes"] = [_enc_hash(h) for h in event.block_hashes]
        d["block_ids"] = list(event.block_ids)
        d["reason"] = event.reason
    return d


def _int_field(d: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    v = d.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise KVInvalidInputError(f"event field {key!r} must be an int, got {v!r}")
    return v


def _ids(d: dict[str, Any], n: int) -> tuple[int, ...]:
    ids = d.get("block_ids")
    if not isinstance(ids, list) or len(ids) != n:
        raise KVInvalidInputError(f"event needs {n} block_ids, got {ids!r}")
    for b in ids:
        if isinstance(b, bool) or not isinstance(b, int):
            raise KVInvalidInputError(f"block id {b!r} is not an int")
    return tuple(ids)


def event_from_dict(d: dict[str, Any]) -> KVEvent:
    """Inverse of ``event_to_dict``; validates every field.

    Raises:
        KVInvalidInputError: unknown type or a malformed field.
    """
    if not isinstance(d, dict):
        raise KVInvalidInputError(f"an event is a JSON object, got {type(d).__name__}")
    kind = d.get("type")
    seq = _int_field(d, "seq")
    ts = d.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise KVInvalidInputError(f"event field 'ts' must be a number, got {ts!r}")
    ts = float(ts)
    if kind == AllBlocksCleared.type:
        return AllBlocksCleared(seq, ts)
    if kind not in (BlockStored.type, BlockRemoved.type):
        raise KVInvalidInputError(f"unknown event type {kind!r}")
    raw = d.get("block_hashes")
    if not isinstance(raw, list):
        raise KVInvalidInputError(f"event field 'block_hashes' must be a list, got {raw!r}")
    hashes = tuple(_dec_hash(h) for h in raw)
    if None in hashes:
        raise KVInvalidInputError("a block hash is null")
    ids = _ids(d, len(hashes))
    if kind == BlockStored.type:
        return BlockStored(
            seq,
            ts,
            hashes,
            _dec_hash(d.get("parent_block_hash")),
            ids,
            _int_field(d, "block_size", optional=True),
        )
    reason = d.get("reason")
    if not isinstance(reason, str):
        raise KVInvalidInputError(f"event field 'reason' must be a string, got {reason!r}")
    return BlockRemoved(seq, ts, hashes, ids, reason)


def events_to_jsonl(events: Iterable[KVEvent]) -> str:
    """One compact JSON object per line (a trailing newline after each)."""
    dumps = json.dumps
    return "".join(dumps(event_to_dict(e), separators=(",", ":")) + "\n" for e in events)


def events_from_jsonl(lines: str | Iterable[str]) -> list[KVEvent]:
    """Parse JSON lines back into events (blank lines skipped).

    Raises:
        KVInvalidInputError: a line is not JSON or not a valid event (its line number given).
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    fast = _fast_decoder()
    out: list[KVEvent] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        event = fast(line) if fast is not None else None
        if event is None:
            event = _parse_line(line, i)
        out.append(event)
    return out


def _parse_line(line: str, i: int) -> KVEvent:
    """The field parser: the reference for every line and the source of every error."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as exc:
        raise KVInvalidInputError(f"line {i}: not JSON ({exc.msg})") from None
    try:
        return event_from_dict(d)
    except KVInvalidInputError as exc:
        raise KVInvalidInputError(f"line {i}: {exc.message}") from None


_FAST: list[Any] = []  # [decoder or None], built on first use


def _fast_decoder() -> Any:
    """``line -> event or None`` through msgspec structs; None without msgspec."""
    if not _FAST:
        try:
            from ._event_structs import decode_line
        except ImportError:  # msgspec is the [events] extra
            _FAST.append(None)
        else:
            _FAST.append(decode_line)
    return _FAST[0]
