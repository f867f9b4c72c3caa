"""Mooncake JSONL: ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}``.

Each hash id stands for one 512-token block and for every block before it
(ids are prefix-chained); ``len(hash_ids) == ceil(input_length / 512)``.
Records are validated line by line; a malformed one raises
``KVTraceFormatError`` naming file, line and field, or is skipped and counted
with ``skip_bad=True``. ``arrival_s`` is ``timestamp / 1000`` (not shifted to
start at 0), ``request_id`` is ``"<file stem>-<line>"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ._common import (
    CANONICAL_COLUMNS,
    TraceRecord,
    check_block_size,
    check_sorted,
    guarded,
    hash_list_field,
    init_stats,
    int_field,
    jsonl_items,
    number_field,
    open_text,
    parse_json_object,
    records_to_frame,
)

__all__ = [
    "CANONICAL_COLUMNS",
    "DEFAULT_TRACE",
    "MOONCAKE_BLOCK_SIZE",
    "bundled_path",
    "iter_mooncake",
    "iter_mooncake_records",
    "read_mooncake",
]

MOONCAKE_BLOCK_SIZE = 512
_BUNDLED = {
    "mooncake": "mooncake_synthetic_trace.jsonl",
    "azure-code-sample": "azure_code_sample.csv",
    "azure-conv-sample": "azure_conv_sample.csv",
    "bailian-synthetic-sample": "bailian_synthetic_sample.jsonl",
    "burstgpt-synthetic-sample": "burstgpt_synthetic_sample.csv",
}


def bundled_path(name: str = "mooncake") -> Path:
    """Path of a trace shipped in ``traces/data`` (``"mooncake"``, ``"azure-code-sample"``,
    ``"azure-conv-sample"``, ``"bailian-synthetic-sample"``, ``"burstgpt-synthetic-sample"``)."""
    try:
        return Path(__file__).resolve().parent / "data" / _BUNDLED[name]
    except KeyError:
        raise KeyError(f"no bundled trace {name!r}; known: {sorted(_BUNDLED)}") from None


DEFAULT_TRACE = bundled_path("mooncake")


def iter_mooncake_records(
    path: str | Path,
    *,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    skip_bad: bool = False,
    stats: dict | None = None,
) -> Iterator[TraceRecord]:
    """Stream canonical :class:`TraceRecord` s (six fields, no session) line by line."""
    path = Path(path)
    block_size = check_block_size(block_size)
    stats = init_stats(stats)
    stem = path.name.split(".")[0] if path.suffix == ".gz" else path.stem
    state = {"last_ts": None}

    def parse(lineno: int, raw: str) -> TraceRecord:
        rec = parse_json_object(path, lineno, raw)
        ts = number_field(rec, "timestamp", path, lineno)
        check_sorted(path, lineno, "timestamp", ts, state["last_ts"])
        n_in = int_field(rec, "input_length", path, lineno, 1)
        n_out = int_field(rec, "output_length", path, lineno, 0)
        ids = hash_list_field(rec, "hash_ids", path, lineno, n_in, block_size)
        state["last_ts"] = ts
        return TraceRecord(f"{stem}-{lineno}", ts / 1000.0, n_in, n_out, ids, block_size)

    with open_text(path) as fh:
        yield from guarded(jsonl_items(path, fh), parse, skip_bad, stats)


def iter_mooncake(
    path: str | Path,
    *,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    skip_bad: bool = False,
    stats: dict | None = None,
) -> Iterator[tuple[str, float, int, int, list[int]]]:
    """Stream ``(request_id, arrival_s, input_length, output_length, hash_ids)`` line by line."""
    for r in iter_mooncake_records(path, block_size=block_size, skip_bad=skip_bad, stats=stats):
        yield r[:5]


def read_mooncake(
    path: str | Path | None = None,
    *,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    skip_bad: bool = False,
    stats: dict | None = None,
):
    """The whole trace (default: the bundled one) as a canonical polars DataFrame."""
    recs = iter_mooncake_records(
        DEFAULT_TRACE if path is None else path,
        block_size=block_size,
        skip_bad=skip_bad,
        stats=stats,
    )
    return records_to_frame(recs, with_sessions=False)
