"""Trace readers into one canonical table, and the bundled sample traces.

Canonical table (polars, Arrow types), one row per request::

    request_id     Utf8     "<file stem>-<line>"
    arrival_s      Float64  seconds from the trace's start
    input_length   Int64    prompt tokens
    output_length  Int64    generated tokens
    block_hashes   List(Int64)  chained block ids (an id stands for its block and its whole prefix)
    block_size     Int64    tokens per hashed block

Only the Mooncake JSONL format is read here so far (see the closing note of the
trace-replay issue for the formats still to come).
"""

from __future__ import annotations

from .mooncake import (
    CANONICAL_COLUMNS,
    DEFAULT_TRACE,
    bundled_path,
    iter_mooncake,
    read_mooncake,
    read_trace,
)

__all__ = [
    "CANONICAL_COLUMNS",
    "DEFAULT_TRACE",
    "bundled_path",
    "iter_mooncake",
    "read_mooncake",
    "read_trace",
]
