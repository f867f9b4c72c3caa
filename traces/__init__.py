"""Trace readers into one canonical table, synthetic generators, writers.

Canonical table (polars, Arrow types), one row per request, columns in order::

    request_id     Utf8          the record's own id, else "<file stem>-<line>"
    arrival_s      Float64       seconds from the trace's start
    input_length   Int64         prompt tokens
    output_length  Int64         generated tokens
    block_hashes   List(Int64)   chained block ids, ceil(input_length / block_size) of
                                 them (an id stands for its block and its whole prefix)
    block_size     Int64         tokens per hashed block
    session_id     Utf8, null    optional: conversation id (formats that know sessions)
    turn           Int64, null   optional: turn in that conversation

``CANONICAL_COLUMNS`` lists all eight; Mooncake and token-level tables have the
first six only. Read with :func:`read_trace` (whole file), :func:`iter_trace`
(records, streamed) or :func:`iter_trace_batches` (DataFrames of bounded size);
formats: mooncake, bailian (Qwen-Bailian), azure, burstgpt, tokens, parquet, and
engine logs: vllm (``prompt_token_ids``), sglang (``input_ids``), lmcache
(lookups), openai-chat (``messages`` + ``tokenizer=``), kv-events (a ``listen``
recording) (see ``traces.io``; :func:`detect_format` tells them apart).
:func:`generate_trace` makes seeded synthetic traces and :func:`write_trace`
writes mooncake, bailian, tokens, burstgpt, vllm, sglang, lmcache or Parquet files.
Malformed records raise ``KVTraceFormatError("<file>:<line>: field '<f>': ...")``
or, with ``skip_bad=True``, are skipped and counted in ``stats``.
"""

from __future__ import annotations

from ._common import CANONICAL_COLUMNS, TraceRecord
from .io import (
    DEFAULT_BLOCK_SIZE,
    FORMATS,
    WRITE_FORMATS,
    detect_format,
    iter_trace,
    iter_trace_batches,
    read_trace,
    write_trace,
)
from .mooncake import DEFAULT_TRACE, bundled_path, iter_mooncake, read_mooncake
from .synthetic import PrefixModel, generate_records, generate_trace, ids_to_tokens
from .tokens import digest_to_int64, hash_tokens

__all__ = [
    "CANONICAL_COLUMNS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_TRACE",
    "FORMATS",
    "WRITE_FORMATS",
    "PrefixModel",
    "TraceRecord",
    "bundled_path",
    "detect_format",
    "digest_to_int64",
    "generate_records",
    "generate_trace",
    "hash_tokens",
    "ids_to_tokens",
    "iter_mooncake",
    "iter_trace",
    "iter_trace_batches",
    "read_mooncake",
    "read_trace",
    "write_trace",
]
