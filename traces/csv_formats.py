"""Length-only CSV traces: Azure LLM inference and BurstGPT.

Both carry arrival times and token counts but no prefix information, so each
request's block ids come from a seeded :class:`traces.synthetic.PrefixModel`
(system prompts with Zipf popularity, documents, multi-turn sessions; see its
docstring) fed with the request's lengths in file order. The same file and the
same model options give the same table in every process.

Azure (``AzureLLMInferenceTrace_{code,conv}.csv``)::

    TIMESTAMP,ContextTokens,GeneratedTokens
    2023-11-16 18:17:03.9799600,4808,10

``TIMESTAMP`` is an ISO date-time (any number of fractional digits, read as UTC).

BurstGPT (``BurstGPT_*.csv``)::

    Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
    5,ChatGPT,472,18,490,Conversation log

``Timestamp`` is in seconds; ``Total tokens`` must equal request + response tokens.

``arrival_s`` is seconds since the first record; ``request_id`` is
``"<file stem>-<line>"`` (the header is line 1). Token counts must be integers
>= 0 (an empty prompt gets no blocks) and at most the per-request maximum
(``max_request_tokens=``, see ``traces._common.MAX_REQUEST_TOKENS``). Columns may
come in any order; extra columns are ignored. A record that breaks the CSV
syntax (an unbalanced quote, say) is reported at the line where it starts.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from ._common import (
    LineError,
    TraceRecord,
    bad,
    check_length,
    check_sorted,
    guarded,
    init_stats,
    iter_lines,
    resolve_max_request_tokens,
)
from .synthetic import PrefixModel

__all__ = [
    "AZURE_COLUMNS",
    "BURSTGPT_COLUMNS",
    "iter_azure_records",
    "iter_burstgpt_records",
    "parse_azure_timestamp",
]

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = (
    "Timestamp",
    "Model",
    "Request tokens",
    "Response tokens",
    "Total tokens",
    "Log Type",
)
_EPOCH = datetime(1970, 1, 1)


class _RowError:
    __slots__ = ("msg",)

    def __init__(self, msg: str) -> None:
        self.msg = msg


def parse_azure_timestamp(text: str) -> float:
    """Seconds since the epoch of ``YYYY-MM-DD HH:MM:SS[.fraction]`` (UTC).

    Raises ValueError on anything else.
    """
    text = text.strip()
    head, dot, frac = text.partition(".")
    if dot and not frac.isdigit():
        raise ValueError(f"bad fractional seconds in {text!r}")
    dt = datetime.fromisoformat(head)
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return (dt - _EPOCH).total_seconds() + (float("0." + frac) if dot else 0.0)


def _csv_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, object]]:
    """``(line, {column: text})`` per data row, or ``(line, _RowError)`` for a bad row.

    A row's line is where its record starts (a quoted field may span lines).
    """
    undecodable: dict[int, str] = {}

    def text() -> Iterator[str]:
        for lineno, line in iter_lines(path):
            if isinstance(line, LineError):
                undecodable[lineno] = line.msg
                line = "\n"  # a blank line in its place; reported below
            yield line

    reader = csv.reader(text(), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise bad(path, 1, "<header>", f"not valid CSV ({exc})") from None
    if undecodable:
        line, msg = min(undecodable.items())
        raise bad(path, line, "<header>", msg)
    header = [h.strip().lstrip("\ufeff") for h in header]
    for name in required:
        if name not in header:
            raise bad(path, 1, name, f"missing from the header {header}")
    index = {name: header.index(name) for name in required}
    width = len(header)
    while True:
        start = reader.line_num + 1  # csv.reader yields [] for a blank line, so exact
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, _RowError(f"not valid CSV in the record starting here ({exc})")
            continue
        if undecodable:
            line, msg = min(undecodable.items())
            undecodable.clear()
            yield line, _RowError(msg)
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != width:
            yield start, _RowError(f"expected {width} fields, got {len(row)}")
            continue
        yield start, {name: row[i] for name, i in index.items()}


def _count(path: Path, line: int, row: dict, name: str, max_tokens: int) -> int:
    text = row[name].strip()
    if len(text) > 30:  # int() of thousands of digits is slow, and no count is that long
        raise bad(path, line, name, f"expected an integer, got {len(text)} characters")
    try:
        v = int(text)
    except ValueError:
        raise bad(path, line, name, f"expected an integer, got {text!r}") from None
    if v < 0:
        raise bad(path, line, name, f"must be >= 0, got {v}")
    check_length(path, line, name, v, max_tokens)
    return v


def _lengths_reader(path, required, fields, block_size, skip_bad, stats, model_kwargs):
    """Shared loop: ``fields(line, row) -> (ts, n_in, n_out, ts_field)`` or None (filtered)."""
    path = Path(path)
    stats = init_stats(stats)
    stats.setdefault("filtered", 0)
    model = PrefixModel(block_size=block_size, **model_kwargs)
    stem = path.name.split(".")[0] if path.suffix == ".gz" else path.stem
    state: dict = {"last_ts": None, "t0": None}

    def parse(lineno: int, row) -> TraceRecord | None:
        if isinstance(row, _RowError):
            raise bad(path, lineno, "<csv>", row.msg)
        got = fields(lineno, row)
        if got is None:
            return None
        ts, n_in, n_out, ts_field = got
        check_sorted(path, lineno, ts_field, ts, state["last_ts"])
        state["last_ts"] = ts
        if state["t0"] is None:
            state["t0"] = ts
        ids, sid, turn = model.fit(n_in, n_out, ts)
        return TraceRecord(
            f"{stem}-{lineno}", ts - state["t0"], n_in, n_out, ids, model.block_size, sid, turn
        )

    for rec in guarded(_csv_rows(path, required), parse, skip_bad, stats):
        if rec is None:
            stats["rows"] -= 1
            stats["filtered"] += 1
        else:
            yield rec


def iter_azure_records(
    path: str | Path,
    *,
    block_size: int = 16,
    skip_bad: bool = False,
    stats: dict | None = None,
    max_request_tokens: int | None = None,
    **model_kwargs,
) -> Iterator[TraceRecord]:
    """Stream an Azure LLM inference CSV as canonical records (with sessions).

    ``max_request_tokens``: most ``ContextTokens``/``GeneratedTokens`` a row may
    declare (default ``traces._common.MAX_REQUEST_TOKENS`` or
    ``$SAGELLM_KV_MAX_REQUEST_TOKENS``); above it the row is a format error.

    ``model_kwargs`` go to :class:`traces.synthetic.PrefixModel` (``seed``,
    ``num_system_prompts``, ``system_prompt_tokens``, ``system_prompt_zipf``,
    ``system_prompt_prob``, ``num_documents``, ``document_tokens``,
    ``document_zipf``, ``document_prob``, ``multi_turn_prob``,
    ``max_open_sessions``, ``max_context_tokens``, ``min_think_s``).
    """

    def fields(lineno: int, row: dict):
        text = row["TIMESTAMP"]
        try:
            ts = parse_azure_timestamp(text)
        except ValueError:
            raise bad(
                path_, lineno, "TIMESTAMP", f"expected 'YYYY-MM-DD HH:MM:SS.ffff', got {text!r}"
            ) from None
        n_in = _count(path_, lineno, row, "ContextTokens", max_tokens)
        n_out = _count(path_, lineno, row, "GeneratedTokens", max_tokens)
        return ts, n_in, n_out, "TIMESTAMP"

    path_ = Path(path)
    max_tokens = resolve_max_request_tokens(max_request_tokens)
    yield from _lengths_reader(
        path_, AZURE_COLUMNS, fields, block_size, skip_bad, stats, model_kwargs
    )


def iter_burstgpt_records(
    path: str | Path,
    *,
    block_size: int = 16,
    skip_bad: bool = False,
    stats: dict | None = None,
    models: Sequence[str] | None = None,
    max_request_tokens: int | None = None,
    **model_kwargs,
) -> Iterator[TraceRecord]:
    """Stream a BurstGPT CSV as canonical records (with sessions).

    ``max_request_tokens``: most ``Request tokens``/``Response tokens`` a row may
    declare (as for :func:`iter_azure_records`).

    ``models``: keep only rows whose ``Model`` is one of these (the others are
    counted in ``stats["filtered"]``; they are not errors). ``model_kwargs`` go
    to :class:`traces.synthetic.PrefixModel` as for :func:`iter_azure_records`.
    """
    keep = None if models is None else frozenset(models)

    def fields(lineno: int, row: dict):
        text = row["Timestamp"].strip()
        try:
            ts = float(text)
        except ValueError:
            raise bad(path_, lineno, "Timestamp", f"expected seconds, got {text!r}") from None
        if not 0 <= ts < float("inf"):
            raise bad(path_, lineno, "Timestamp", f"must be a finite number >= 0, got {text}")
        model = row["Model"].strip()
        if not model:
            raise bad(path_, lineno, "Model", "empty")
        n_in = _count(path_, lineno, row, "Request tokens", max_tokens)
        n_out = _count(path_, lineno, row, "Response tokens", max_tokens)
        total = _count(path_, lineno, row, "Total tokens", 2 * max_tokens)
        if total != n_in + n_out:
            raise bad(
                path_,
                lineno,
                "Total tokens",
                f"{total} != Request tokens {n_in} + Response tokens {n_out}",
            )
        if not row["Log Type"].strip():
            raise bad(path_, lineno, "Log Type", "empty")
        if keep is not None and model not in keep:
            return None
        return ts, n_in, n_out, "Timestamp"

    path_ = Path(path)
    max_tokens = resolve_max_request_tokens(max_request_tokens)
    yield from _lengths_reader(
        path_, BURSTGPT_COLUMNS, fields, block_size, skip_bad, stats, model_kwargs
    )
