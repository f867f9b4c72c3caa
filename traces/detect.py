"""Format auto-detection (``format="auto"``): :func:`detect_format`.

The rules are listed in :mod:`traces.io`'s docstring; :data:`DETECT_KEYS` gives
the JSON keys that identify each JSONL format from its first record.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from sagellm_kv_cache.errors import KVTraceFormatError

from ._common import LineError, iter_lines

__all__ = ["DETECT_KEYS", "detect_format", "recording_parts"]

#: JSON keys that identify a format from its first record, in the order tried.
DETECT_KEYS = (
    ("tokens", "tokens"),
    ("chat_id", "bailian"),
    ("hash_ids", "mooncake"),
    ("prompt_token_ids", "vllm"),
    ("input_ids", "sglang"),
    ("chunk_hashes", "lmcache"),
    ("messages", "openai-chat"),
)
#: Columns of a ``listen`` recording part that tell it from a canonical Parquet table.
_RECORDING_MARK = frozenset({"seq", "payload", "endpoint"})


def _formats() -> tuple:
    from .io import FORMATS

    return FORMATS


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _first_line(path: Path) -> str | None:
    for _, raw in islice(iter_lines(path), 1000):
        if isinstance(raw, LineError):
            return None
        if raw.strip():
            return raw
    return None


_MOONCAKE_FIELDS = frozenset({"timestamp", "input_length", "output_length"})


def _sniff_record(line: str | None) -> dict | None:
    try:
        rec = json.loads(line) if line else None
    except (ValueError, RecursionError):  # the reader reports it with its line
        return None
    return rec if isinstance(rec, dict) else None


def _sniff_json(line: str | None) -> str | None:
    rec = _sniff_record(line)
    if rec is None:
        return None
    for key, fmt in DETECT_KEYS:
        if key in rec:
            return fmt
    if isinstance(rec.get("body"), dict) and "messages" in rec["body"]:
        return "openai-chat"  # an OpenAI Batch API line
    return None


def _sniff_csv(line: str | None) -> str | None:
    header = [h.strip().lstrip("\ufeff") for h in (line or "").split(",")]
    if "ContextTokens" in header:
        return "azure"
    if "Request tokens" in header:
        return "burstgpt"
    return None


def recording_parts(path: Path) -> list[Path] | None:
    """The Parquet parts of a ``listen`` recording at ``path``, or None if it is not one."""
    import pyarrow.parquet as pq

    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
    elif _base_suffix(path) == ".parquet":
        parts = [path]
    else:
        return None
    if not parts:
        return None
    try:
        names = set(pq.read_schema(parts[0]).names)
    except Exception:  # unreadable: the canonical Parquet reader reports it
        return None
    return parts if names >= _RECORDING_MARK else None


def detect_format(path: str | Path) -> str:
    """The format ``format="auto"`` reads ``path`` as (see the module docstring).

    Raises:
        KVTraceFormatError: nothing identifies the format (the message lists the
            keys and headers that would).
    """
    path = Path(path)
    ext = _base_suffix(path)
    if path.is_dir() or ext == ".parquet":
        if recording_parts(path) is not None:
            return "kv-events"
        if ext == ".parquet":
            return "parquet"
        raise KVTraceFormatError(
            f"{path}: a folder is read only as a `listen` recording (Parquet parts with "
            f"columns {sorted(_RECORDING_MARK)}), and this is not one",
            path=str(path),
        )
    line = _first_line(path)
    if ext in (".jsonl", ".json", ".ndjson"):
        fmt = _sniff_json(line)
        if fmt is not None:
            return fmt
        rec = _sniff_record(line)
        if rec is None or _MOONCAKE_FIELDS & set(rec):
            return "mooncake"  # its reader reports what is wrong, at the line
        raise KVTraceFormatError(
            f"{path.name}:1: cannot tell the trace format from the first record's keys "
            f"{sorted(rec)[:8]}; known keys: "
            f"{', '.join(f'{k} ({f})' for k, f in DETECT_KEYS)}; or pass format=",
            path=str(path),
            line=1,
        )
    fmt = _sniff_csv(line) if ext == ".csv" or not (line or "").lstrip().startswith("{") else None
    fmt = fmt or (_sniff_json(line) if ext != ".csv" else None)
    if fmt is None:
        raise KVTraceFormatError(
            f"{path}: cannot tell the trace format from its extension {ext!r} and first "
            f"record; pass format= one of {', '.join(_formats())}",
            path=str(path),
        )
    return fmt
