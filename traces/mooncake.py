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
    check_sorted,
    file_stem,
    hash_list_field,
    jsonl_reader,
    length_field,
    number_field,
    parse_json_object,
    records_to_frame,
)
from .fastjson import MooncakeLine, decode_line, ids_ok, timestamp_ok

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
    "vllm-sample": "vllm_requests_sample.jsonl",
    "sglang-sample": "sglang_requests_sample.jsonl",
    "lmcache-sample": "lmcache_lookups_sample.jsonl",
    "openai-chat-sample": "openai_chat_sample.jsonl",
}


def bundled_path(name: str = "mooncake") -> Path:
    """Path of a trace shipped in ``traces/data`` (``"mooncake"``, ``"azure-code-sample"``,
    ``"azure-conv-sample"``, ``"bailian-synthetic-sample"``, ``"burstgpt-synthetic-sample"``,
    and the tiny hand-written request logs ``"vllm-sample"``, ``"sglang-sample"``,
    ``"lmcache-sample"``, ``"openai-chat-sample"``)."""
    try:
        return Path(__file__).resolve().parent / "data" / _BUNDLED[name]
    except KeyError:
        raise KeyError(f"no bundled trace {name!r}; known: {sorted(_BUNDLED)}") from None


DEFAULT_TRACE = bundled_path("mooncake")


@jsonl_reader(MOONCAKE_BLOCK_SIZE)
def iter_mooncake_records(path: Path, block_size: int, max_tokens: int):
    """Stream canonical :class:`TraceRecord` s (six fields, no session) line by line.

    ``iter_mooncake_records(path, *, block_size=512, skip_bad=False, stats=None,
    max_request_tokens=None)``; ``max_request_tokens``: longest
    ``input_length``/``output_length`` accepted (default
    ``traces._common.MAX_REQUEST_TOKENS`` or ``$SAGELLM_KV_MAX_REQUEST_TOKENS``).
    """
    stem = file_stem(path)
    state = {"last_ts": None}

    def parse(lineno: int, raw: str) -> TraceRecord:
        fast = decode_line(raw, MooncakeLine)
        if fast is not None:
            ts, n_in, n_out, ids = (
                fast.timestamp, fast.input_length, fast.output_length, fast.hash_ids
            )  # fmt: skip
            if (
                timestamp_ok(ts, state["last_ts"])
                and 1 <= n_in <= max_tokens
                and 0 <= n_out <= max_tokens
                and ids_ok(ids, n_in, block_size)
            ):
                state["last_ts"] = ts
                return TraceRecord(f"{stem}-{lineno}", ts / 1000.0, n_in, n_out, ids, block_size)
        return parse_fields(lineno, raw)  # the reference: names the bad field

    def parse_fields(lineno: int, raw: str) -> TraceRecord:
        rec = parse_json_object(path, lineno, raw)
        ts = number_field(rec, "timestamp", path, lineno)
        check_sorted(path, lineno, "timestamp", ts, state["last_ts"])
        n_in = length_field(rec, "input_length", path, lineno, 1, max_tokens)
        n_out = length_field(rec, "output_length", path, lineno, 0, max_tokens)
        ids = hash_list_field(rec, "hash_ids", path, lineno, n_in, block_size)
        state["last_ts"] = ts
        return TraceRecord(f"{stem}-{lineno}", ts / 1000.0, n_in, n_out, ids, block_size)

    return parse


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
