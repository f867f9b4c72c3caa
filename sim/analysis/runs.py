"""Read any run into one :class:`Run`: a replay's folder, its files, a trace, access statistics.

=========================  ==================================================
input                      what is read
=========================  ==================================================
a replay's folder          ``config.json``, ``records.parquet``,
                           ``summary.json``, optional ``accesses.parquet``
                           (block accesses) and ``timeline.parquet``; without
                           accesses, they are derived from the trace that
                           ``config.json`` names when it is readable
``records.parquet``        that file and its folder's siblings
``summary.json``           that file and its folder's siblings
access statistics          a ``.json``/``.parquet`` export of
                           ``AccessStatsCollector`` (``demo``'s output)
a trace                    any format ``traces.read_trace`` reads; hits are
                           those of an infinite cache
=========================  ==================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm_kv_cache.errors import KVInvalidInputError, KVTraceFormatError

__all__ = ["RUN_FILES", "Run", "load_run"]

#: files of a replay's output folder
RUN_FILES = ("config.json", "records.parquet", "summary.json", "accesses.parquet")
_ACCESS_META_KEY = b"sagellm_kv_cache.access_stats"
_ACCESS_FORMAT = "sagellm-kv-access-stats"
_MAX_JSON_DOC_BYTES = 64 << 20  # a larger .json is read as a trace (JSONL)


@dataclass
class Run:
    """Everything known about one run; absent parts are None.

    Attributes:
        path: what was read.
        kind: ``"run"`` (a replay's files), ``"trace"`` or ``"access_stats"``.
        records: one row per request (polars).
        summary, config: the run's ``summary.json`` and ``config.json``.
        accesses: block-access table (the collector's event table, polars).
        accesses_source: ``"recorded"``, ``"trace"`` (derived from the trace
            and the records) or ``"trace, infinite cache"``.
        timeline: a concurrent replay's ``timeline.parquet``.
        sessions_inferred: sessions were inferred from first block hashes.
        collector: the ``AccessStatsCollector`` of access statistics.
        notes: what was left out, for the reader.
    """

    path: Path
    kind: str
    records: Any = None
    summary: dict | None = None
    config: dict | None = None
    accesses: Any = None
    accesses_source: str | None = None
    timeline: Any = None
    sessions_inferred: bool = False
    collector: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name if self.path.is_dir() else self.path.stem

    @property
    def capacity_blocks(self) -> int | None:
        for doc in (self.summary, self.config):
            if doc and isinstance(doc.get("capacity_blocks"), int):
                return doc["capacity_blocks"]
        return None


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KVTraceFormatError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise KVTraceFormatError(f"{path}: expected a JSON object")
    return doc


def _read_parquet(path: Path) -> Any:
    import polars as pl

    try:
        return pl.read_parquet(path)
    except Exception as exc:  # polars raises several types for a bad file
        raise KVTraceFormatError(f"{path}: not a readable Parquet file ({exc})") from None


def _is_access_stats(path: Path) -> bool:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.read_schema(path).metadata or {}
        except Exception:
            return False
        return _ACCESS_META_KEY in meta
    if path.suffix.lower() == ".json":
        return _json_kind(path) == "access_stats"
    return False


def _json_kind(path: Path) -> str:
    """``"access_stats"``, ``"summary"`` or ``"trace"`` (JSONL) for a ``.json`` file."""
    try:
        if path.stat().st_size > _MAX_JSON_DOC_BYTES:
            return "trace"
        doc = json.loads(path.read_bytes())
    except OSError:
        return "trace"
    except ValueError as exc:
        # several records, one a line: a trace; a broken document: let the
        # collector's loader name what is wrong
        return "trace" if "Extra data" in str(exc) else "access_stats"
    if isinstance(doc, dict) and ("accesses" in doc or doc.get("format") == _ACCESS_FORMAT):
        return "access_stats"
    if isinstance(doc, dict) and "token_hit_ratio" in doc:
        return "summary"
    return "trace"


def _load_access_stats(path: Path) -> Run:
    from sagellm_kv_cache.profiling import AccessStatsCollector

    collector = AccessStatsCollector.load(path)
    return Run(
        path=path,
        kind="access_stats",
        accesses=collector.to_polars(),
        accesses_source="recorded",
        collector=collector,
    )


def _load_dir(folder: Path, *, with_trace: bool, max_accesses: int) -> Run:
    from . import access

    present = [name for name in RUN_FILES if (folder / name).is_file()]
    if not present:
        raise KVInvalidInputError(
            f"{folder}: not a run folder (none of {', '.join(RUN_FILES)} is there)"
        )
    run = Run(path=folder, kind="run")
    if (folder / "config.json").is_file():
        run.config = _read_json(folder / "config.json")
    if (folder / "summary.json").is_file():
        run.summary = _read_json(folder / "summary.json")
    if (folder / "records.parquet").is_file():
        run.records = _read_parquet(folder / "records.parquet")
    if (folder / "timeline.parquet").is_file():
        run.timeline = _read_parquet(folder / "timeline.parquet")
    if (folder / "accesses.parquet").is_file():
        acc = _load_access_stats(folder / "accesses.parquet")
        run.accesses, run.collector, run.accesses_source = acc.accesses, acc.collector, "recorded"
    table = _trace_of(run) if with_trace else None
    if run.records is not None:
        run.records, run.sessions_inferred = access.with_sessions(run.records, table)
    if run.accesses is None and table is not None and run.records is not None:
        run.accesses = access.accesses_from_trace(table, run.records, max_accesses=max_accesses)
        run.accesses_source = "trace"
    return run


def _trace_of(run: Run) -> Any:
    """The trace ``config.json`` names, or None (with a note) when it cannot be read."""
    trace = (run.config or {}).get("trace")
    if not trace:
        return None
    fmt = (run.config or {}).get("format") or "auto"
    block_size = (run.config or {}).get("block_size")
    try:
        from traces import read_trace

        return read_trace(trace, fmt, block_size=block_size)
    except Exception as exc:  # any unreadable trace: the run's own files still draw
        run.notes.append(f"trace {trace} not read ({exc}); no block-level figures")
        return None


def _load_trace(path: Path, fmt: str, block_size: int | None, max_accesses: int) -> Run:
    from traces import read_trace

    from . import access

    table = read_trace(path, fmt, block_size=block_size)
    events = access.accesses_from_trace(table, max_accesses=max_accesses)
    records = access.requests_from_accesses(events, table)
    records, inferred = access.with_sessions(records, table)
    run = Run(
        path=path,
        kind="trace",
        records=records,
        accesses=events,
        accesses_source="trace, infinite cache",
        sessions_inferred=inferred,
    )
    kept = events["request_id"].n_unique() if events.height else 0
    if kept < table.height and events.height >= max_accesses:
        run.notes.append(f"block accesses of the first {kept} of {table.height} requests")
    return run


def load_run(
    path: str | Path,
    *,
    format: str = "auto",
    block_size: int | None = None,
    with_trace: bool = True,
    max_accesses: int | None = None,
) -> Run:
    """Read a run folder, one of its files, access statistics or a trace (see module doc).

    Args:
        path: what to read.
        format: trace format when ``path`` is a trace (``traces.read_trace``).
        block_size: tokens per block for a token-level trace.
        with_trace: for a run folder without recorded accesses, read the trace
            its config names to derive them.
        max_accesses: bound on accesses derived from a trace
            (default ``access.DEFAULT_MAX_ACCESSES``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        KVInvalidInputError: a folder without any run file.
        KVTraceFormatError: a file that is none of the above.
    """
    from . import access

    if not isinstance(path, (str, Path)):
        raise KVInvalidInputError(f"path must be a str or Path, got {type(path).__name__}")
    limit = access.DEFAULT_MAX_ACCESSES if max_accesses is None else max_accesses
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(str(path))
    if path.is_dir():
        return _load_dir(path, with_trace=with_trace, max_accesses=limit)
    if _is_access_stats(path):
        return _load_access_stats(path)
    if path.name in ("summary.json", "records.parquet", "config.json") or (
        path.suffix.lower() == ".json" and _json_kind(path) == "summary"
    ):
        return _load_dir(path.parent, with_trace=with_trace, max_accesses=limit)
    return _load_trace(path, format, block_size, limit)
