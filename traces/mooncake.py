"""Mooncake JSONL: ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}``.

Each hash id stands for one 512-token block and for every block before it
(ids are prefix-chained); ``len(hash_ids) == ceil(input_length / 512)``.
Records are validated line by line; a malformed one raises
``KVTraceFormatError`` naming file, line and field, or is skipped and counted
with ``skip_bad=True``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from sagellm_kv_cache.errors import KVTraceFormatError

__all__ = [
    "CANONICAL_COLUMNS",
    "DEFAULT_TRACE",
    "bundled_path",
    "iter_mooncake",
    "read_mooncake",
    "read_trace",
]

MOONCAKE_BLOCK_SIZE = 512
CANONICAL_COLUMNS = (
    "request_id",
    "arrival_s",
    "input_length",
    "output_length",
    "block_hashes",
    "block_size",
)
_BUNDLED = {
    "mooncake": "mooncake_synthetic_trace.jsonl",
    "azure-code-sample": "azure_code_sample.csv",
}


def bundled_path(name: str = "mooncake") -> Path:
    """Path of a trace shipped in ``traces/data`` (``"mooncake"``, ``"azure-code-sample"``)."""
    try:
        return Path(__file__).resolve().parent / "data" / _BUNDLED[name]
    except KeyError:
        raise KeyError(f"no bundled trace {name!r}; known: {sorted(_BUNDLED)}") from None


DEFAULT_TRACE = bundled_path("mooncake")


def _bad(path: Path, line: int, field: str, msg: str) -> KVTraceFormatError:
    return KVTraceFormatError(
        f"{path.name}:{line}: field {field!r}: {msg}", path=str(path), line=line, field=field
    )


def _int_field(rec: dict, name: str, path: Path, line: int, minimum: int) -> int:
    if name not in rec:
        raise _bad(path, line, name, "missing")
    v = rec[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(path, line, name, f"expected an integer, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise _bad(path, line, name, f"must be >= {minimum}, got {v}")
    return v


def iter_mooncake(
    path: str | Path,
    *,
    block_size: int = MOONCAKE_BLOCK_SIZE,
    skip_bad: bool = False,
    stats: dict | None = None,
) -> Iterator[tuple[str, float, int, int, list[int]]]:
    """Stream ``(request_id, arrival_s, input_length, output_length, hash_ids)`` line by line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file not found: {path}")
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    stats.setdefault("skipped_lines", [])
    last_ts = None
    with path.open("r", encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise _bad(
                        path, lineno, "<json>", f"not valid JSON ({exc.msg} at column {exc.colno})"
                    ) from None
                if not isinstance(rec, dict):
                    raise _bad(path, lineno, "<json>", "a record must be a JSON object")
                ts = rec.get("timestamp")
                if isinstance(ts, bool) or not isinstance(ts, int | float):
                    raise _bad(
                        path,
                        lineno,
                        "timestamp",
                        "missing" if ts is None else f"expected a number, got {ts!r}",
                    )
                if ts < 0:
                    raise _bad(path, lineno, "timestamp", f"must be >= 0, got {ts}")
                if last_ts is not None and ts < last_ts:
                    raise _bad(
                        path,
                        lineno,
                        "timestamp",
                        f"{ts} is earlier than the previous record's {last_ts} (unsorted)",
                    )
                n_in = _int_field(rec, "input_length", path, lineno, 1)
                n_out = _int_field(rec, "output_length", path, lineno, 0)
                ids = rec.get("hash_ids")
                if not isinstance(ids, list) or not all(
                    isinstance(h, int) and not isinstance(h, bool) for h in ids
                ):
                    raise _bad(
                        path,
                        lineno,
                        "hash_ids",
                        "missing" if ids is None else "expected a list of integers",
                    )
                expected = -(-n_in // block_size)
                if len(ids) != expected:
                    raise _bad(
                        path,
                        lineno,
                        "hash_ids",
                        f"expected {expected} hash ids for input_length {n_in} at block_size {block_size}, got {len(ids)}",
                    )
            except KVTraceFormatError as err:
                if not skip_bad:
                    raise
                stats["skipped"] += 1
                if len(stats["skipped_lines"]) < 100:
                    stats["skipped_lines"].append((lineno, err.message))
                continue
            last_ts = ts
            yield f"{path.stem}-{lineno}", ts / 1000.0, n_in, n_out, ids


def read_mooncake(
    path: str | Path = DEFAULT_TRACE, *, skip_bad: bool = False, stats: dict | None = None
):
    """The whole trace as a canonical polars DataFrame (see the package docstring)."""
    import polars as pl

    rows = list(iter_mooncake(path, skip_bad=skip_bad, stats=stats))
    cols = list(zip(*rows)) if rows else [[]] * 5
    return pl.DataFrame(
        {
            "request_id": pl.Series(cols[0], dtype=pl.Utf8),
            "arrival_s": pl.Series(cols[1], dtype=pl.Float64),
            "input_length": pl.Series(cols[2], dtype=pl.Int64),
            "output_length": pl.Series(cols[3], dtype=pl.Int64),
            "block_hashes": pl.Series(cols[4], dtype=pl.List(pl.Int64)),
            "block_size": pl.Series([MOONCAKE_BLOCK_SIZE] * len(rows), dtype=pl.Int64),
        }
    )


def read_trace(path: str | Path = DEFAULT_TRACE, format: str = "auto", **kwargs):
    """Read a trace into the canonical table. Formats: ``mooncake`` (``auto`` picks it for .jsonl)."""
    fmt = format.lower()
    if fmt == "auto":
        fmt = "mooncake" if str(path).endswith((".jsonl", ".json")) else fmt
    if fmt != "mooncake":
        raise KVTraceFormatError(
            f"{path}: trace format {format!r} is not supported yet (supported: mooncake)"
        )
    return read_mooncake(path, **kwargs)
