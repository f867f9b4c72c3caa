"""Sequential replay of a trace file in bounded memory: block hashes streamed in batches.

``replay_stream(path, capacity)`` is ``replay_sequential(read_trace(path),
capacity)`` without the whole ``block_hashes`` column in memory: a first pass
keeps the per-request scalar columns (request id, arrival, lengths: tens of
bytes per request), a second streams the block hashes batch by batch
(``traces.iter_trace_batches``) into the one event engine, which serves each
request before the next. Memory: the pool's (blocks in the cache) + the
scalars + one batch (8 bytes per block of it, ``traces.columnar``).

A Parquet trace's scalar pass reads only those columns; other formats are
parsed twice. Capacities that need the trace's distinct-block count
(``"inf"``, ``"10%"``) get it from the streamed ids (one extra pass keeping a
set of them: memory per distinct block), so prefer blocks, tokens or bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sagellm_kv_cache.errors import KVConfigError

from .result import SimResult

__all__ = ["replay_stream", "scalar_columns"]

_SCALARS = ("request_id", "arrival_s", "input_length", "output_length", "block_size")


def scalar_columns(path: str | Path, format: str = "auto", *, batch_size: int = 65536, **kw: Any):
    """The trace's table without ``block_hashes`` (one pass; Parquet: those columns only)."""
    import polars as pl

    from traces import detect_format, iter_trace_batches

    path = Path(path)
    fmt = detect_format(path) if format == "auto" and path.is_file() else format
    if fmt == "parquet" and not kw:
        cols = pl.scan_parquet(path).collect_schema().names()
        keep = [c for c in cols if c != "block_hashes"]
        return pl.scan_parquet(path).select(keep).collect()
    parts = [
        b.drop("block_hashes")
        for b in iter_trace_batches(path, format, batch_size=batch_size, **kw)
    ]
    return pl.concat(parts)


def _streamed(path: Path, format: str, batch_size: int, n: int, kw: dict):
    from traces import iter_trace_batches
    from traces.columnar import StreamedHashes

    batches = iter_trace_batches(path, format, batch_size=batch_size, **kw)
    return StreamedHashes((b["block_hashes"] for b in batches), n)


def _distinct(path: Path, format: str, batch_size: int, kw: dict) -> int:
    from traces import iter_trace_batches
    from traces.columnar import hash_arrays

    seen: set[int] = set()
    for b in iter_trace_batches(path, format, batch_size=batch_size, **kw):
        seen.update(hash_arrays(b)[0].tolist())
    return max(1, len(seen))


def replay_stream(
    path: str | Path,
    capacity: Any,
    policy: str = "lru",
    *,
    format: str = "auto",
    batch_size: int = 65536,
    progress: bool = False,
    **kw: Any,
) -> SimResult:
    """Sequential replay of the trace at ``path``, its block hashes streamed in batches.

    Args:
        path, format: the trace (``traces.read_trace``'s arguments; reader
            options such as ``block_size=`` or ``skip_bad=`` go in ``kw``).
        capacity: blocks or capacity text (``sim.config``); ``"inf"`` and shares
            cost an extra pass (module docstring).
        policy: eviction policy name.
        batch_size: requests per streamed batch.

    Returns:
        the ``SimResult`` ``replay_sequential(read_trace(path), capacity, policy)``
        gives, request for request.

    Raises:
        KVConfigError: ``batch_size`` not a positive int.
    """
    from .simulate import simulate

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise KVConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    path = Path(path)
    table = scalar_columns(path, format, batch_size=batch_size, **kw)
    if capacity is None or (isinstance(capacity, str) and capacity.strip() == "inf"):
        capacity = _distinct(path, format, batch_size, kw)  # what an infinite replay uses
    elif isinstance(capacity, str) and capacity.strip().endswith("%"):
        from .capacity import resolve_capacity

        bs = int(table["block_size"][0]) if table.height else 1
        capacity = resolve_capacity(
            capacity, block_size=bs, distinct_blocks=lambda: _distinct(path, format, batch_size, kw)
        ).blocks
    hashes = _streamed(path, format, batch_size, table.height, kw)
    return simulate(table, capacity, policy, mode="sequential", hashes=hashes, progress=progress)
