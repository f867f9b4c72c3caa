"""Pieces every trace reader shares: the canonical schema, records, errors, line loops.

Canonical table (polars, Arrow types), one row per request, columns in this order::

    request_id     Utf8          the record's own id where the format has one,
                                 else "<file stem>-<line>"
    arrival_s      Float64       seconds (Mooncake: its ms timestamp / 1000; other
                                 formats: seconds since the first record's timestamp)
    input_length   Int64         prompt tokens
    output_length  Int64         generated tokens
    block_hashes   List(Int64)   chained block ids, ceil(input_length / block_size)
                                 of them: an id stands for its block *and its whole
                                 prefix*; the last one covers a partial block when
                                 input_length is not a multiple of block_size
    block_size     Int64         tokens per hashed block
    session_id     Utf8 (null)   optional: the conversation the request belongs to
    turn           Int64 (null)  optional: its turn in that conversation

The two optional columns exist only for formats that know sessions (Qwen-Bailian,
the synthetic prefix model behind Azure/BurstGPT, the synthetic generators);
Mooncake and token-level tables have exactly the first six.

Hostile input: every reader decodes each line as UTF-8 on its own, so a bad
byte, a corrupt or truncated ``.gz``, JSON nested too deep, a number too large
for its column, or a length above the per-request maximum becomes a
``KVTraceFormatError`` naming ``<file>:<line>`` (and the field), never a raw
Python error.

Per-request maximum (:data:`MAX_REQUEST_TOKENS`, 4,000,000 tokens): readers
that make blocks from a length (every format: Mooncake/Bailian
``input_length``, Azure ``ContextTokens``, BurstGPT ``Request tokens``, the
length of a token list) reject a prompt or output longer than that, so an
81-byte row cannot make the reader allocate gigabytes. Override it per call
with ``max_request_tokens=`` or for a whole process (the CLI included) with
the environment variable ``SAGELLM_KV_MAX_REQUEST_TOKENS``; the argument wins.
"""

from __future__ import annotations

import gzip
import io
import numbers
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from sagellm_kv_cache.errors import KVTraceFormatError

from .columnar import flat_from_lists, list_series

BASE_COLUMNS = (
    "request_id",
    "arrival_s",
    "input_length",
    "output_length",
    "block_hashes",
    "block_size",
)
SESSION_COLUMNS = ("session_id", "turn")
#: Canonical column names in table order; the last two are optional (see module doc).
CANONICAL_COLUMNS = BASE_COLUMNS + SESSION_COLUMNS

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_KEPT_SKIPS = 100
#: Default longest prompt (and longest output) a record may declare, in tokens.
MAX_REQUEST_TOKENS = 4_000_000
#: Environment variable that overrides :data:`MAX_REQUEST_TOKENS` (a positive integer).
MAX_REQUEST_TOKENS_ENV = "SAGELLM_KV_MAX_REQUEST_TOKENS"


def resolve_max_request_tokens(value: int | None = None) -> int:
    """The per-request token maximum: ``value``, else ``$SAGELLM_KV_MAX_REQUEST_TOKENS``,
    else :data:`MAX_REQUEST_TOKENS`.

    Raises:
        KVConfigError: ``value`` or the environment variable is not a positive integer.
    """
    from sagellm_kv_cache.errors import KVConfigError

    source = "max_request_tokens"
    if value is None:
        env = os.environ.get(MAX_REQUEST_TOKENS_ENV)
        if env is None or not env.strip():
            return MAX_REQUEST_TOKENS
        source = MAX_REQUEST_TOKENS_ENV
        try:
            value = int(env.strip())
        except ValueError:
            raise KVConfigError(
                f"{MAX_REQUEST_TOKENS_ENV} must be a positive integer, got {env!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= INT64_MAX:
        raise KVConfigError(f"{source} must be a positive integer, got {value!r}")
    return value


class TraceRecord(NamedTuple):
    """One request of a trace, in canonical units (a row of the canonical table)."""

    request_id: str
    arrival_s: float
    input_length: int
    output_length: int
    block_hashes: list[int]
    block_size: int
    session_id: str | None = None
    turn: int | None = None


def canonical_schema(with_sessions: bool) -> dict:
    """Column name -> polars dtype of the canonical table."""
    import polars as pl

    schema = {
        "request_id": pl.Utf8,
        "arrival_s": pl.Float64,
        "input_length": pl.Int64,
        "output_length": pl.Int64,
        "block_hashes": pl.List(pl.Int64),
        "block_size": pl.Int64,
    }
    if with_sessions:
        schema["session_id"] = pl.Utf8
        schema["turn"] = pl.Int64
    return schema


def records_to_frame(records: Iterable[TraceRecord], with_sessions: bool):
    """Canonical polars DataFrame of ``records`` (columns per ``with_sessions``)."""
    import polars as pl

    rows = list(records)
    schema = canonical_schema(with_sessions)
    cols = list(zip(*rows)) if rows else [()] * 8
    data = {
        name: pl.Series(name, list(cols[i]), dtype=dtype)
        for i, (name, dtype) in enumerate(schema.items())
        if name != "block_hashes"
    }
    data["block_hashes"] = list_series(*flat_from_lists(cols[4]))
    return pl.DataFrame({name: data[name] for name in schema})


def bad(path: Path, line: int, field: str, msg: str) -> KVTraceFormatError:
    """The reader error: ``"<file>:<line>: field '<field>': <msg>"``."""
    return KVTraceFormatError(
        f"{path.name}:{line}: field {field!r}: {msg}", path=str(path), line=line, field=field
    )


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"


def int_field(
    rec: dict, name: str, path: Path, line: int, minimum: int | None, maximum: int = INT64_MAX
) -> int:
    """``rec[name]`` as an int in ``[minimum, maximum]`` (bool is not an int here)."""
    if name not in rec:
        raise bad(path, line, name, "missing")
    v = rec[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(path, line, name, f"expected an integer, got {type(v).__name__} {_short(v)}")
    if minimum is not None and v < minimum:
        raise bad(path, line, name, f"must be >= {minimum}, got {_short(v)}")
    if v > maximum:
        raise bad(path, line, name, f"must be <= {maximum}, got {_short(v)}")
    return v


def length_field(rec: dict, name: str, path: Path, line: int, minimum: int, max_tokens: int) -> int:
    """A token count: an int in ``[minimum, max_tokens]`` (the per-request maximum)."""
    v = int_field(rec, name, path, line, minimum)
    check_length(path, line, name, v, max_tokens)
    return v


def check_length(path: Path, line: int, field: str, n: int, max_tokens: int) -> None:
    """Reject a token count above the per-request maximum (see the module docstring)."""
    if n > max_tokens:
        raise bad(
            path,
            line,
            field,
            f"{_short(n)} tokens is above the per-request maximum of {max_tokens} "
            f"(raise it with max_request_tokens= or {MAX_REQUEST_TOKENS_ENV})",
        )


def number_field(rec: dict, name: str, path: Path, line: int) -> float:
    """``rec[name]`` as a finite number >= 0 (an int must also fit in a float)."""
    v = rec.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(
            path, line, name, "missing" if v is None else f"expected a number, got {_short(v)}"
        )
    if isinstance(v, int) and v > 2**53:
        try:
            float(v)
        except OverflowError:
            raise bad(path, line, name, f"number too large: {_short(v)}") from None
    if not v >= 0 or v == float("inf"):
        raise bad(path, line, name, f"must be a finite number >= 0, got {_short(v)}")
    return v


def hash_list_field(
    rec: dict, name: str, path: Path, line: int, n_in: int, block_size: int
) -> list[int]:
    """``rec[name]`` as a list of int64 ids, exactly ``ceil(n_in / block_size)`` long."""
    ids = rec.get(name)
    if not isinstance(ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in ids
    ):
        raise bad(path, line, name, "missing" if ids is None else "expected a list of integers")
    expected = -(-n_in // block_size)
    if len(ids) != expected:
        raise bad(
            path,
            line,
            name,
            f"expected {expected} hash ids for input_length {n_in} at block_size "
            f"{block_size}, got {len(ids)}",
        )
    if ids and (min(ids) < INT64_MIN or max(ids) > INT64_MAX):
        raise bad(path, line, name, "hash ids must fit in a signed 64-bit integer")
    return ids


def check_sorted(path: Path, line: int, field: str, ts: float, last_ts: float | None) -> None:
    if last_ts is not None and ts < last_ts:
        raise bad(
            path, line, field, f"{ts} is earlier than the previous record's {last_ts} (unsorted)"
        )


def check_block_size(block_size: Any) -> int:
    from sagellm_kv_cache.errors import KVConfigError

    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise KVConfigError(f"block_size must be a positive int, got {block_size!r}")
    if block_size <= 0:
        raise KVConfigError(f"block_size must be a positive int, got {block_size!r}")
    return int(block_size)  # numpy integers too


class LineError(NamedTuple):
    """A line that could not be decoded (kept in place so ``skip_bad`` can skip it)."""

    msg: str


def iter_lines(path: Path) -> Iterator[tuple[int, str | LineError]]:
    """``(line, text)`` of every line of ``path`` (``.gz`` decompressed on the fly).

    Each line is decoded as UTF-8 on its own: an undecodable one comes as a
    :class:`LineError` in its place (its reader reports or skips it). A corrupt or
    truncated ``.gz`` raises ``KVTraceFormatError`` at the line where it broke.
    """
    if not path.exists():
        raise FileNotFoundError(f"trace file not found: {path}")
    lineno = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    text = LineError(f"not valid UTF-8 (bad byte at column {exc.start + 1})")
                yield lineno, text
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        what = "truncated" if isinstance(exc, EOFError) else "corrupt"
        raise bad(
            path, lineno + 1, "<gzip>", f"{what} gzip data ({type(exc).__name__}: {exc})"
        ) from None


def open_text(path: Path) -> io.TextIOBase:
    """Open a trace for reading as UTF-8 text (``.gz`` files are decompressed on the fly)."""
    if not path.exists():
        raise FileNotFoundError(f"trace file not found: {path}")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def init_stats(stats: dict | None) -> dict:
    """The ``stats`` dict readers fill: ``rows`` read, ``skipped`` records and
    ``skipped_lines`` (up to 100 ``(line, message)`` pairs)."""
    stats = stats if stats is not None else {}
    stats.setdefault("rows", 0)
    stats.setdefault("skipped", 0)
    stats.setdefault("skipped_lines", [])
    return stats


def guarded(
    items: Iterable[tuple[int, Any]],
    parse: Callable[[int, Any], Any],
    skip_bad: bool,
    stats: dict,
) -> Iterator[Any]:
    """Yield ``parse(line, item)`` for each item; a ``KVTraceFormatError`` propagates,
    or with ``skip_bad`` is counted in ``stats`` and the item skipped.

    ``parse`` must change no reader state before it has validated the whole item,
    so that a skipped item leaves the reader as if it had never been seen.
    """
    for lineno, item in items:
        try:
            out = parse(lineno, item)
        except KVTraceFormatError as err:
            if not skip_bad:
                raise
            stats["skipped"] += 1
            if len(stats["skipped_lines"]) < MAX_KEPT_SKIPS:
                stats["skipped_lines"].append((lineno, err.message))
            continue
        stats["rows"] += 1
        yield out


def jsonl_items(path: Path) -> Iterator[tuple[int, str | LineError]]:
    """``(line, raw line)`` of the non-blank lines of ``path`` (see :func:`iter_lines`)."""
    for lineno, raw in iter_lines(path):
        if isinstance(raw, LineError) or raw.strip():
            yield lineno, raw


def file_stem(path: Path) -> str:
    """The prefix of the ids made up for a file's lines: its name up to the first dot
    for a ``.gz``, else its stem."""
    return path.name.split(".")[0] if path.suffix == ".gz" else path.stem


def jsonl_reader(default_block_size: int):
    """Decorator: a JSONL format's line-parser factory becomes its public reader.

    The decorated ``make_parse(path, block_size, max_tokens, **options)`` returns the
    format's ``parse(line, raw) -> TraceRecord``; it becomes, under its own name and
    docstring, ``reader(path, *, block_size=default_block_size, skip_bad=False,
    stats=None, max_request_tokens=None, **options)``, which does what every JSONL
    reader does: check ``block_size`` and the per-request maximum, build the parser
    (which checks the format's own options, a tokenizer or a hash function), then
    parse each non-blank line through :func:`guarded`. Like any generator, the
    reader checks nothing before it is first iterated.
    """

    def wrap(
        make_parse: Callable[..., Callable[[int, Any], TraceRecord]],
    ) -> Callable[..., Iterator[TraceRecord]]:
        def read(
            path: str | Path,
            *,
            block_size: int = default_block_size,
            skip_bad: bool = False,
            stats: dict | None = None,
            max_request_tokens: int | None = None,
            **options: Any,
        ) -> Iterator[TraceRecord]:
            path = Path(path)
            block_size = check_block_size(block_size)
            max_tokens = resolve_max_request_tokens(max_request_tokens)
            parse = make_parse(path, block_size, max_tokens, **options)
            yield from guarded(jsonl_items(path), parse, skip_bad, init_stats(stats))

        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(read, attr, getattr(make_parse, attr))
        return read

    return wrap


class RequestLine:
    """What every request-log reader shares: ids (unique, as text) and arrival times.

    ``take(rec, line, id_fields, ts_fields)`` validates a record's id and time
    without changing anything; ``commit`` records them once the whole line is good
    (so a skipped line leaves the reader as if never seen). A line without an id
    gets ``"<file stem>-<line>"``; arrival times count from the first timestamp,
    and a line without one keeps the previous line's.
    """

    __slots__ = ("arrival", "last_ts", "path", "seen", "stem", "t0")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stem = file_stem(path)
        self.seen: set[str] = set()
        self.last_ts: float | None = None
        self.t0: float | None = None
        self.arrival = 0.0

    def bad_id(self, rid: Any) -> str:
        return f"expected a string or integer id, got {type(rid).__name__}"

    def repeated(self, rid: str) -> str:
        return f"{rid!r} already appeared earlier"

    def take(
        self, rec: dict, line: int, id_fields: tuple[str, ...], ts_fields: tuple[str, ...]
    ) -> tuple[str, float | None]:
        rid: Any = f"{self.stem}-{line}"
        for name in id_fields:
            if name in rec:
                rid = rec[name]
                if isinstance(rid, bool) or not isinstance(rid, str | int) or rid == "":
                    raise bad(self.path, line, name, self.bad_id(rid))
                break
        rid = str(rid)
        if rid in self.seen:
            raise bad(self.path, line, id_fields[0], self.repeated(rid))
        ts = None
        for name in ts_fields:
            if name in rec:
                ts = number_field(rec, name, self.path, line)
                check_sorted(self.path, line, name, ts, self.last_ts)
                break
        return rid, ts

    def commit(self, rid: str, ts: float | None) -> float:
        self.seen.add(rid)
        if ts is not None:
            self.last_ts = ts
            if self.t0 is None:
                self.t0 = ts
            self.arrival = float(ts - self.t0)
        return self.arrival


def parse_json_object(path: Path, lineno: int, raw: str | LineError) -> dict:
    """One JSONL record; every way a line can fail is a ``KVTraceFormatError``."""
    import json

    if isinstance(raw, LineError):
        raise bad(path, lineno, "<utf-8>", raw.msg)
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise bad(
            path, lineno, "<json>", f"not valid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    except RecursionError:
        raise bad(path, lineno, "<json>", "JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer over Python's digit limit
        raise bad(path, lineno, "<json>", f"not valid JSON ({exc})") from None
    if not isinstance(rec, dict):
        raise bad(path, lineno, "<json>", "a record must be a JSON object")
    return rec
