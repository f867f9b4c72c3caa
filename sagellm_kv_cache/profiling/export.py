"""Access-stats files: the JSON and Parquet exports of a collector, and their loading.

* ``.json``: ``{"format": "sagellm-kv-access-stats", "version": 1,
  "block_id_type": "int" | "str" | "bytes" | "mixed", "summary": {...},
  "time_windows": {...}, "accesses": {column: [values...]},
  "evictions": {"block_id": [...], "timestamp": [...], "reason": [...],
  "block_hash": [...]}}``. Columns are lists of equal length; ``null`` marks
  a missing value. Block ids are written as JSON ints or strings; ``bytes``
  ids (and block hashes) as lowercase hex strings; ids are restored to
  ``bytes`` on load when ``block_id_type`` is ``"bytes"`` (hashes stay hex).
  ``summary`` and ``time_windows`` are informational: :func:`load`
  recomputes them from ``accesses``.
* ``.parquet``: the event table of :func:`to_polars` (columns ``timestamp``,
  ``block_id``, ``is_hit``, ``request_id``, ``position``, ``tier``,
  ``size_bytes``, ``block_code``; codes are recomputed on load) with the format
  name, version, ``block_id_type``, time windows and evictions as JSON in the
  file's key-value metadata under ``sagellm_kv_cache.access_stats``.

Every function here works on a collector snapshot (see
``AccessStatsCollector.snapshot``); polars is imported when a table is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KVInvalidInputError, KVTraceFormatError
from .interning import id_to_json, kind_of
from .summary import summarize

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "evictions_to_polars",
    "export_stats",
    "load",
    "to_json_dict",
    "to_pandas",
    "to_polars",
]

FORMAT_NAME = "sagellm-kv-access-stats"
FORMAT_VERSION = 1
_PARQUET_META_KEY = "sagellm_kv_cache.access_stats"
_ACCESS_COLUMNS = (
    "block_id",
    "timestamp",
    "is_hit",
    "request_id",
    "position",
    "tier",
    "size_bytes",
)


def to_json_dict(s: dict[str, Any], time_windows: dict[str, float]) -> dict[str, Any]:
    """The ``.json`` document of snapshot ``s``."""
    summary = summarize(s, time_windows)
    windows = summary.pop("time_windows")
    keys = s["block_keys"]
    block_json = [id_to_json(k) for k in keys]
    req_json = [id_to_json(k) for k in s["request_keys"]]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "block_id_type": kind_of(keys),
        "summary": summary,
        "time_windows": windows,
        "accesses": {
            "block_id": [block_json[b] for b in s["block"].tolist()],
            "timestamp": s["timestamp"].tolist(),
            "is_hit": s["is_hit"].tolist(),
            "request_id": [None if r < 0 else req_json[r] for r in s["request"].tolist()],
            "position": [None if p < 0 else p for p in s["position"].tolist()],
            "tier": [None if t < 0 else s["tier_keys"][t] for t in s["tier"].tolist()],
            "size_bytes": [None if b < 0 else b for b in s["size_bytes"].tolist()],
        },
        "evictions": _evictions_json(s),
    }


def export_stats(s: dict[str, Any], time_windows: dict[str, float], path: str | Path) -> Path:
    """Write snapshot ``s`` to ``path`` (``.json`` or ``.parquet``); returns the path.

    Raises:
        KVInvalidInputError: the suffix is neither ``.json`` nor ``.parquet``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        doc = to_json_dict(s, time_windows)
        with path.open("w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
        return path
    if suffix == ".parquet":
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "block_id_type": kind_of(s["block_keys"]),
            "time_windows": time_windows,
            "evictions": _evictions_json(s),
        }
        import pyarrow.parquet as pq

        # through pyarrow: readers that look at the Arrow schema's metadata (not only
        # the file's key-value metadata, which polars writes) find the key there too
        table = to_polars(s).to_arrow()
        table = table.replace_schema_metadata({_PARQUET_META_KEY: json.dumps(meta)})
        pq.write_table(table, path)
        return path
    raise KVInvalidInputError(
        f"{path}: unknown export format {path.suffix!r}; use .json or .parquet"
    )


def load(cls: Any, path: str | Path) -> Any:
    """Read a ``.json`` or ``.parquet`` export back into a new ``cls`` collector.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        KVTraceFormatError: the file is not a valid export; the message
            names the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() == ".parquet":
        return _load_parquet(cls, path)
    return _load_json(cls, path)


def _load_json(cls: Any, path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise KVTraceFormatError(
            f"{path}: not valid JSON ({exc})", path=str(path), line=line
        ) from None
    if not isinstance(doc, dict):
        raise KVTraceFormatError(f"{path}: expected a JSON object at the top level", path=str(path))
    if doc.get("version") != FORMAT_VERSION:
        raise KVTraceFormatError(
            f"{path}: field 'version' is {doc.get('version')!r}, expected {FORMAT_VERSION}",
            path=str(path),
            field="version",
        )
    accesses = doc.get("accesses")
    if not isinstance(accesses, dict):
        raise KVTraceFormatError(
            f"{path}: field 'accesses' is missing or not an object",
            path=str(path),
            field="accesses",
        )
    cols = {}
    for name in _ACCESS_COLUMNS:
        col = accesses.get(name)
        if col is None and name not in ("block_id", "timestamp", "is_hit"):
            continue
        if not isinstance(col, list):
            raise KVTraceFormatError(
                f"{path}: field 'accesses.{name}' is missing or not a list",
                path=str(path),
                field=f"accesses.{name}",
            )
        cols[name] = col
    n = len(cols["block_id"])
    for name, col in cols.items():
        if len(col) != n:
            raise KVTraceFormatError(
                f"{path}: field 'accesses.{name}' has {len(col)} entries, 'accesses.block_id' has {n}",
                path=str(path),
                field=f"accesses.{name}",
            )
    windows = doc.get("time_windows")
    window_sizes = None
    if isinstance(windows, dict) and all(
        isinstance(v, dict) and "window_s" in v for v in windows.values()
    ):
        window_sizes = {k: float(v["window_s"]) for k, v in windows.items()}
    kind = doc.get("block_id_type")
    evictions = doc.get("evictions") or {}
    return _from_columns(cls, path, cols, kind, window_sizes, evictions)


def _load_parquet(cls: Any, path: Path) -> Any:
    import polars as pl

    try:
        raw = pl.read_parquet_metadata(path).get(_PARQUET_META_KEY)
        table = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise KVTraceFormatError(
            f"{path}: not a readable Parquet file ({exc})", path=str(path)
        ) from None
    meta = {}
    if raw is not None:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            raise KVTraceFormatError(
                f"{path}: corrupt access-stats metadata", path=str(path)
            ) from None
    missing = [c for c in ("block_id", "timestamp", "is_hit") if c not in table.columns]
    if missing:
        raise KVTraceFormatError(
            f"{path}: missing column(s) {', '.join(missing)}", path=str(path), field=missing[0]
        )
    cols = {c: table[c].to_list() for c in _ACCESS_COLUMNS if c in table.columns}
    return _from_columns(
        cls,
        path,
        cols,
        meta.get("block_id_type"),
        meta.get("time_windows"),
        meta.get("evictions") or {},
    )


def _from_columns(
    cls: Any,
    path: Path,
    cols: dict[str, list],
    kind: str | None,
    window_sizes: dict[str, float] | None,
    evictions: dict[str, list],
) -> Any:
    def restore(ids: list) -> list:
        if kind == "bytes":
            try:
                return [bytes.fromhex(b) for b in ids]
            except (TypeError, ValueError):
                raise KVTraceFormatError(
                    f"{path}: block ids are not hex strings", path=str(path), field="block_id"
                ) from None
        return ids

    block_ids = restore(cols["block_id"])
    bad = next(
        (b for b in block_ids if not isinstance(b, (str, int, bytes)) or isinstance(b, bool)),
        None,
    )
    if bad is not None:
        raise KVTraceFormatError(
            f"{path}: block id {bad!r} is not a string or integer",
            path=str(path),
            field="block_id",
        )
    collector = cls(clock=lambda: 0.0, time_windows=window_sizes)
    try:
        collector.record_many(
            block_ids,
            np.asarray(cols["is_hit"], dtype=bool),
            timestamps=np.asarray(cols["timestamp"], dtype=np.float64),
            request_ids=cols.get("request_id"),
            positions=cols.get("position"),
            tiers=cols.get("tier"),
            size_bytes=cols.get("size_bytes"),
        )
        ev_ids = restore(evictions.get("block_id", []))
        for b, t, reason, h in zip(
            ev_ids,
            evictions.get("timestamp", []),
            evictions.get("reason", []),
            evictions.get("block_hash", []),
        ):
            collector.record_eviction(b, reason, timestamp=float(t), block_hash=h)
    except (TypeError, ValueError) as exc:
        raise KVTraceFormatError(f"{path}: bad value in accesses ({exc})", path=str(path)) from None
    return collector


def _evictions_json(s: dict[str, Any]) -> dict[str, list]:
    keys = s["block_keys"]
    return {
        "block_id": [id_to_json(keys[b]) for b in s["evict_block"].tolist()],
        "timestamp": s["evict_ts"].tolist(),
        "reason": list(s["evict_reason"]),
        "block_hash": [None if h is None else id_to_json(h) for h in s["evict_hash"]],
    }


def to_polars(s: dict[str, Any]) -> Any:
    """The event table of snapshot ``s`` (columns: ``AccessStatsCollector.to_polars``)."""
    import polars as pl

    keys = s["block_keys"]
    if kind_of(keys) == "int":
        labels = pl.Series("block_id", keys, dtype=pl.Int64)
    else:
        labels = pl.Series("block_id", [str(id_to_json(k)) for k in keys], dtype=pl.String)
    req_labels = pl.Series(
        [str(id_to_json(k)) for k in s["request_keys"]] + [None], dtype=pl.String
    )
    tier_labels = pl.Series([str(k) for k in s["tier_keys"]] + [None], dtype=pl.String)
    codes = pl.Series("block_code", s["block"], dtype=pl.Int64)
    # -1 (missing) gathers the trailing null of the label series
    req_idx = np.where(s["request"] < 0, len(s["request_keys"]), s["request"])
    tier_idx = np.where(s["tier"] < 0, len(s["tier_keys"]), s["tier"])
    pos = s["position"]
    size = s["size_bytes"]
    return pl.DataFrame(
        [
            pl.Series("timestamp", s["timestamp"], dtype=pl.Float64),
            labels.gather(codes) if len(codes) else labels.clear(),
            codes,
            pl.Series("is_hit", s["is_hit"], dtype=pl.Boolean),
            req_labels.gather(req_idx).alias("request_id"),
            pl.Series("position", pos, dtype=pl.Int64).set(pl.Series(pos < 0), None),
            tier_labels.gather(tier_idx).alias("tier"),
            pl.Series("size_bytes", size, dtype=pl.Int64).set(pl.Series(size < 0), None),
        ]
    )


def to_pandas(s: dict[str, Any]) -> Any:
    """:func:`to_polars` as a ``pandas.DataFrame`` (``position``, ``size_bytes`` nullable ``Int64``)."""
    return to_polars(s).to_pandas().astype({"position": "Int64", "size_bytes": "Int64"})


def evictions_to_polars(s: dict[str, Any]) -> Any:
    """Evictions of snapshot ``s``: ``timestamp``, ``block_id``, ``reason``, ``block_hash``."""
    import polars as pl

    keys = s["block_keys"]
    return pl.DataFrame(
        {
            "timestamp": s["evict_ts"],
            "block_id": [id_to_json(keys[b]) for b in s["evict_block"].tolist()]
            if kind_of(keys) != "int"
            else [keys[b] for b in s["evict_block"].tolist()],
            "reason": s["evict_reason"],
            "block_hash": [None if h is None else str(id_to_json(h)) for h in s["evict_hash"]],
        },
        schema_overrides={
            "timestamp": pl.Float64,
            "reason": pl.String,
            "block_hash": pl.String,
        },
    )
