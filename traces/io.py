"""One entry point per direction: :func:`read_trace`, :func:`iter_trace`,
:func:`iter_trace_batches` and :func:`write_trace`.

Formats (``format=``; ``"auto"`` decides from the extension and the first record):

============  ==========================================  ===========  ==========
format        file                                        block_size   sessions
============  ==========================================  ===========  ==========
mooncake      JSONL with ``hash_ids`` (traces.mooncake)   512          no
bailian       JSONL with ``chat_id`` (traces.bailian)     16           yes
azure         CSV ``TIMESTAMP,ContextTokens,...``         16 (model)   yes (model)
burstgpt      CSV ``Timestamp,Model,Request tokens,...``  16 (model)   yes (model)
tokens        JSONL with ``tokens`` (traces.tokens)       16 (any)     no
parquet       the canonical table as written here         as stored    as stored
vllm          JSONL with ``prompt_token_ids``             16 (any)     no
              (traces.engine_logs)
sglang        JSONL with ``input_ids`` (SGLang request)   16 (any)     no
lmcache       JSONL with ``chunk_hashes`` (LMCache        chunk_size   no
              lookups)                                    (256)
openai-chat   JSONL with ``messages`` (traces.chat);      16 (any)     no
              needs ``tokenizer=``
kv-events     a ``sage-kv-stats listen`` recording        as recorded  no
              (folder of Parquet parts; traces.kv_events)
============  ==========================================  ===========  ==========

Auto-detection (:data:`DETECT_KEYS`): a folder of ``*.parquet`` parts or a
``.parquet`` file with the recording's columns (``seq``, ``payload``) ->
kv-events; another ``.parquet`` -> parquet; a ``.csv`` header naming
``ContextTokens`` -> azure, ``Request tokens`` -> burstgpt; a JSON first record
is matched by its keys in this order: ``tokens`` -> tokens, ``chat_id`` ->
bailian, ``hash_ids`` -> mooncake, ``prompt_token_ids`` -> vllm, ``input_ids`` ->
sglang, ``chunk_hashes`` -> lmcache, ``messages`` (or a Batch ``body`` with
them) -> openai-chat; a ``.jsonl`` record with none of them but a Mooncake
field (``timestamp``, ``input_length``) or no JSON object at all -> mooncake
(whose reader reports what is wrong, at its line). Any ``.gz`` suffix is
stripped first and the file read compressed. Anything else raises
``KVTraceFormatError`` naming the keys it knows.

Every reader takes ``max_request_tokens`` (the longest prompt or output a record
may declare; default ``traces._common.MAX_REQUEST_TOKENS``, 4,000,000, or the
environment variable ``SAGELLM_KV_MAX_REQUEST_TOKENS``) and rejects repeated
request ids (compared as text: ``7`` and ``"7"`` are one id) at the line of the
repeat.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError, KVTraceFormatError

from ._common import (
    BASE_COLUMNS,
    SESSION_COLUMNS,
    TraceRecord,
    canonical_schema,
    init_stats,
    records_to_frame,
    resolve_max_request_tokens,
)
from .bailian import BAILIAN_BLOCK_SIZE, iter_bailian_records
from .chat import iter_chat_records
from .csv_formats import iter_azure_records, iter_burstgpt_records
from .detect import DETECT_KEYS, detect_format
from .engine_logs import iter_lmcache_records, iter_sglang_records, iter_vllm_records
from .mooncake import DEFAULT_TRACE, MOONCAKE_BLOCK_SIZE, iter_mooncake_records
from .tokens import TOKENS_BLOCK_SIZE, iter_tokens_records
from .writers import JSONL_WRITERS, WRITER_OPTIONS, write_burstgpt, write_jsonl

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DETECT_KEYS",
    "FORMATS",
    "WRITE_FORMATS",
    "detect_format",
    "iter_trace",
    "iter_trace_batches",
    "read_trace",
    "write_trace",
]

FORMATS = (
    "mooncake",
    "bailian",
    "azure",
    "burstgpt",
    "tokens",
    "parquet",
    "vllm",
    "sglang",
    "lmcache",
    "openai-chat",
    "kv-events",
)
WRITE_FORMATS = (
    "mooncake",
    "bailian",
    "tokens",
    "parquet",
    "burstgpt",
    "vllm",
    "sglang",
    "lmcache",
)
#: Block size each format is read at when ``block_size=None`` (lmcache: the file's
#: ``chunk_size``, else 256; parquet and kv-events: as stored).
DEFAULT_BLOCK_SIZE = {
    "mooncake": MOONCAKE_BLOCK_SIZE,
    "bailian": BAILIAN_BLOCK_SIZE,
    "azure": 16,
    "burstgpt": 16,
    "tokens": TOKENS_BLOCK_SIZE,
    "vllm": TOKENS_BLOCK_SIZE,
    "sglang": TOKENS_BLOCK_SIZE,
    "openai-chat": TOKENS_BLOCK_SIZE,
}
_MODEL_OPTIONS = frozenset(
    {
        "seed",
        "num_system_prompts",
        "system_prompt_tokens",
        "system_prompt_zipf",
        "system_prompt_prob",
        "num_documents",
        "document_tokens",
        "document_zipf",
        "document_prob",
        "multi_turn_prob",
        "max_open_sessions",
        "max_context_tokens",
        "min_think_s",
    }
)
#: Extra keyword options each format accepts.
FORMAT_OPTIONS = {
    "mooncake": frozenset(),
    "bailian": frozenset(),
    "azure": _MODEL_OPTIONS,
    "burstgpt": _MODEL_OPTIONS | {"models"},
    "tokens": frozenset({"hash_fn", "extra_keys"}),
    "parquet": frozenset(),
    "vllm": frozenset({"hash_fn", "extra_keys"}),
    "sglang": frozenset({"hash_fn", "extra_keys"}),
    "lmcache": frozenset(),
    "openai-chat": frozenset({"tokenizer", "hash_fn", "extra_keys"}),
    "kv-events": frozenset({"endpoint", "data_parallel_rank", "medium"}),
}
_READERS = {
    "mooncake": iter_mooncake_records,
    "bailian": iter_bailian_records,
    "azure": iter_azure_records,
    "burstgpt": iter_burstgpt_records,
    "tokens": iter_tokens_records,
    "vllm": iter_vllm_records,
    "sglang": iter_sglang_records,
    "lmcache": iter_lmcache_records,
    "openai-chat": iter_chat_records,
}
#: Formats read as a whole table (validated per batch; ``skip_bad`` does not apply).
_TABLE_FORMATS = ("parquet", "kv-events")
#: Rows per batch :func:`read_trace` reads (then concatenates).
_READ_BATCH = 1 << 20
_WITH_SESSIONS = {"mooncake": False, "bailian": True, "azure": True, "burstgpt": True}


def _resolve(path, format: str, block_size, options: dict) -> tuple[Path, str, int | None]:
    path = Path(path)
    if not isinstance(format, str) or format.lower() not in (*FORMATS, "auto"):
        raise KVTraceFormatError(
            f"{path}: unknown trace format {format!r} (known: auto, {', '.join(FORMATS)})",
            path=str(path),
        )
    if not path.exists():
        raise FileNotFoundError(f"trace file not found: {path}")
    fmt = format.lower()
    if fmt == "auto":
        fmt = detect_format(path)
    unknown = set(options) - FORMAT_OPTIONS[fmt]
    if unknown:
        raise KVConfigError(
            f"format {fmt!r} takes no option(s) {sorted(unknown)}; "
            f"it accepts {sorted(FORMAT_OPTIONS[fmt]) or 'none'}"
        )
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE.get(fmt)  # None: the file's own (see the table)
    if path.is_dir() and fmt != "kv-events":
        raise KVTraceFormatError(
            f"{path}: a folder, not a {fmt} file (only kv-events recordings are folders)",
            path=str(path),
        )
    return path, fmt, block_size


# -- Parquet (the canonical table itself) -----------------------------------------------------
def _check_frame(df, path: Path, first_row: int, last_ts: list, max_tokens: int, seen: set):
    """Cast a Parquet batch to the canonical schema and check its invariants
    (``seen``: the request ids of the earlier batches, updated here)."""
    import polars as pl

    for name in BASE_COLUMNS:
        if name not in df.columns:
            raise KVTraceFormatError(
                f"{path.name}:0: field {name!r}: missing column", path=str(path), field=name
            )
    with_sessions = all(c in df.columns for c in SESSION_COLUMNS)
    schema = canonical_schema(with_sessions)
    try:
        df = df.select([pl.col(c).cast(t, strict=True) for c, t in schema.items()])
    except Exception as exc:  # polars raises several types for a failed cast
        raise KVTraceFormatError(
            f"{path.name}:0: field '<schema>': cannot cast to the canonical types ({exc})",
            path=str(path),
        ) from None
    seen_ids = pl.Series(list(seen), dtype=pl.Utf8)
    checks = [
        ("input_length", pl.col("input_length") < 0, "negative length"),
        ("output_length", pl.col("output_length") < 0, "negative length"),
        (
            "input_length",
            pl.col("input_length") > max_tokens,
            f"above the per-request maximum of {max_tokens} tokens",
        ),
        (
            "output_length",
            pl.col("output_length") > max_tokens,
            f"above the per-request maximum of {max_tokens} tokens",
        ),
        (
            "request_id",
            ~pl.col("request_id").is_first_distinct()
            | pl.col("request_id").is_in(seen_ids.implode()),
            "repeated request id (ids are compared as text)",
        ),
        ("block_size", pl.col("block_size") <= 0, "block_size must be positive"),
        (
            "block_hashes",
            pl.col("block_hashes").list.len()
            != (pl.col("input_length") + pl.col("block_size") - 1) // pl.col("block_size"),
            "expected ceil(input_length / block_size) hash ids",
        ),
        ("arrival_s", pl.col("arrival_s").diff() < 0, "unsorted"),
    ]
    for field, expr, msg in checks:
        bad_rows = df.with_row_index("_row").filter(expr.fill_null(False))["_row"]
        crosses = field == "arrival_s" and last_ts[0] is not None and df.height
        if crosses and df["arrival_s"][0] < last_ts[0]:  # vs the previous batch's end
            bad_rows = [0]
        if len(bad_rows):
            row = first_row + int(bad_rows[0]) + 1
            raise KVTraceFormatError(
                f"{path.name}:{row}: field {field!r}: {msg} (row {row})",
                path=str(path),
                line=row,
                field=field,
            )
    if df.height:
        last_ts[0] = df["arrival_s"][-1]
        seen.update(df["request_id"].to_list())
    return df


def _parquet_batches(
    path: Path, batch_size: int, stats: dict, block_size: int | None, max_tokens: int | None
):
    """Batches of up to ``batch_size`` rows, read by polars (one batch in memory)."""
    import polars as pl

    max_tokens = resolve_max_request_tokens(max_tokens)
    last_ts: list = [None]
    seen: set = set()
    row = 0

    def unreadable(exc: Exception) -> KVTraceFormatError:
        return KVTraceFormatError(
            f"{path.name}:0: field '<parquet>': not a readable Parquet file ({exc})",
            path=str(path),
        )

    try:
        lf = pl.scan_parquet(path)
        schema = lf.collect_schema()
        batches = iter(lf.collect_batches(chunk_size=batch_size))
    except Exception as exc:  # polars raises ComputeError, OSError...
        raise unreadable(exc) from None
    while True:
        try:
            raw = next(batches, None)
        except Exception as exc:
            raise unreadable(exc) from None
        if raw is None:
            break
        if not raw.height:
            continue
        df = _check_frame(raw, path, row, last_ts, max_tokens, seen)
        if block_size is not None and (df["block_size"] != block_size).any():
            raise KVConfigError(
                f"{path.name}: a Parquet trace keeps its stored block size "
                f"{int(df['block_size'][0])}; it cannot be re-hashed at {block_size}"
            )
        row += df.height
        stats["rows"] += df.height
        yield df
    if row == 0:  # keep the stored columns on an empty file
        yield _check_frame(pl.DataFrame(schema=schema), path, 0, last_ts, max_tokens, seen)


def _table_batches(
    path: Path,
    fmt: str,
    batch_size: int,
    stats: dict,
    block_size: int | None,
    max_tokens: int | None,
    options: dict,
):
    """Batches of the formats read as whole tables (:data:`_TABLE_FORMATS`)."""
    if fmt == "parquet":
        yield from _parquet_batches(path, batch_size, stats, block_size, max_tokens)
        return
    from .kv_events import recording_to_trace

    table = recording_to_trace(path, max_request_tokens=max_tokens, **options)
    if block_size is not None and len(table) and (table["block_size"] != block_size).any():
        raise KVConfigError(
            f"{path.name}: a recording keeps its engine's block size "
            f"{int(table['block_size'][0])}; it cannot be re-hashed at {block_size}"
        )
    stats["rows"] += table.height
    for start in range(0, max(table.height, 1), batch_size):
        yield table.slice(start, batch_size)


# -- public readers ---------------------------------------------------------------------------
def iter_trace(
    path: str | Path = DEFAULT_TRACE,
    format: str = "auto",
    *,
    block_size: int | None = None,
    skip_bad: bool = False,
    stats: dict | None = None,
    max_request_tokens: int | None = None,
    **options,
) -> Iterator[TraceRecord]:
    """Stream a trace's requests as :class:`TraceRecord` s, one line at a time.

    Args:
        path: the trace file (``.gz`` allowed for the text formats).
        format: ``"auto"`` or one of :data:`FORMATS`.
        block_size: tokens per block; None: the format's (:data:`DEFAULT_BLOCK_SIZE`).
            Formats with stored hash ids (mooncake, bailian) validate their id
            counts against it; the others hash/model at it; Parquet only accepts
            its stored size (``KVConfigError`` otherwise).
        skip_bad: skip malformed records, counting them in ``stats``, instead of
            raising ``KVTraceFormatError`` (``"<file>:<line>: field '<f>': ..."``).
            Parquet is checked per batch (column types, lengths, id counts, order;
            the "line" is the 1-based row) and always raises.
        stats: a dict to fill with ``rows``, ``skipped`` and ``skipped_lines``.
        max_request_tokens: the longest prompt or output a record may declare
            (default ``$SAGELLM_KV_MAX_REQUEST_TOKENS``, else 4,000,000 tokens);
            a longer one is a ``KVTraceFormatError`` naming file, line and field.
        options: format options: the :class:`traces.synthetic.PrefixModel` keywords
            for azure and burstgpt (and ``models`` for burstgpt), ``hash_fn`` and
            ``extra_keys`` for tokens.
    """
    path, fmt, block_size = _resolve(path, format, block_size, options)
    if fmt in _TABLE_FORMATS:
        stats = init_stats(stats)
        batches = _table_batches(path, fmt, 65536, stats, block_size, max_request_tokens, options)
        for df in batches:
            with_sessions = "session_id" in df.columns
            for row in df.iter_rows():
                yield TraceRecord(*row) if with_sessions else TraceRecord(*row[:6])
        return
    yield from _READERS[fmt](
        path,
        block_size=block_size,
        skip_bad=skip_bad,
        stats=stats,
        max_request_tokens=max_request_tokens,
        **options,
    )


def iter_trace_batches(
    path: str | Path = DEFAULT_TRACE,
    format: str = "auto",
    *,
    batch_size: int = 65536,
    block_size: int | None = None,
    skip_bad: bool = False,
    stats: dict | None = None,
    max_request_tokens: int | None = None,
    **options,
):
    """Yield the canonical table in DataFrames of up to ``batch_size`` rows.

    Same arguments as :func:`iter_trace`; memory is bounded by one batch (plus a
    format's per-request bookkeeping: Bailian's chat -> session map, the prefix
    model's open sessions). ``pl.concat`` of the batches equals :func:`read_trace`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise KVConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    path, fmt, block_size = _resolve(path, format, block_size, options)
    if fmt in _TABLE_FORMATS:
        yield from _table_batches(
            path, fmt, batch_size, init_stats(stats), block_size, max_request_tokens, options
        )
        return
    recs = _READERS[fmt](
        path,
        block_size=block_size,
        skip_bad=skip_bad,
        stats=stats,
        max_request_tokens=max_request_tokens,
        **options,
    )
    with_sessions = _WITH_SESSIONS.get(fmt, False)
    emitted = False
    while True:
        chunk = list(islice(recs, batch_size))
        if not chunk and emitted:
            return
        emitted = True
        yield records_to_frame(chunk, with_sessions)
        if len(chunk) < batch_size:
            return


def read_trace(path: str | Path = DEFAULT_TRACE, format: str = "auto", **kwargs):
    """Read a whole trace into the canonical table (see :data:`traces.CANONICAL_COLUMNS`).

    Same arguments as :func:`iter_trace`. Mooncake and token-level tables have the
    six base columns; Bailian, Azure, BurstGPT and synthetic ones add
    ``session_id`` and ``turn``; Parquet gives back what was written.
    """
    import polars as pl

    if "batch_size" in kwargs:
        raise KVConfigError("read_trace takes no batch_size: see iter_trace_batches")
    batches = list(iter_trace_batches(path, format, batch_size=_READ_BATCH, **kwargs))
    return batches[0] if len(batches) == 1 else pl.concat(batches)


# -- writers ----------------------------------------------------------------------------------
def write_trace(table, path: str | Path, format: str = "parquet", **options) -> Path:
    """Write a canonical table as ``format`` (one of :data:`WRITE_FORMATS`).

    * ``parquet``: the table as is; :func:`read_trace` gives it back identical.
    * ``mooncake``: ``timestamp`` = ``arrival_s * 1000`` (ms, an int when whole),
      ``hash_ids`` = ``block_hashes``. Request ids and sessions are not kept;
      read back with ``block_size=`` the table's if it is not 512.
    * ``bailian``: ``chat_id`` = ``request_id`` when it is an integer, else the row
      number; ``parent_chat_id`` = the previous request of the same ``session_id``
      (``-1`` without sessions), ``turn`` from the table (1 without), ``type`` ``"text"``.
    * ``tokens``, ``vllm``, ``sglang``: token ids from
      :func:`traces.synthetic.ids_to_tokens` (option ``vocab_size``, default
      32000): reading them back (at the table's ``block_size``) hashes to
      different ids with the same sharing structure.
    * ``lmcache``: ``chunk_hashes`` = ``block_hashes``, ``chunk_size`` =
      ``block_size``; output lengths are not kept.
    * ``burstgpt``: lengths and times only (options ``model``, ``log_type``).

    What each keeps is tabled in :mod:`traces.writers`. Returns the path written.
    """
    path = Path(path)
    fmt = str(format).lower()
    if fmt not in WRITE_FORMATS:
        raise KVConfigError(f"cannot write format {format!r}; choose one of {WRITE_FORMATS}")
    missing = [c for c in BASE_COLUMNS if c not in table.columns]
    if missing:
        raise KVInvalidInputError(f"not a canonical trace table: missing columns {missing}")
    allowed = WRITER_OPTIONS.get(fmt, set())
    if set(options) - allowed:
        raise KVConfigError(f"format {fmt!r} takes no option(s) {sorted(set(options) - allowed)}")
    if fmt == "parquet":
        table.write_parquet(path)
        return path
    if fmt == "burstgpt":
        return write_burstgpt(table, path, options)
    assert fmt in JSONL_WRITERS, fmt
    return write_jsonl(table, path, fmt, options)
