"""A recorded vLLM KV-event stream as a trace: "what would another cache have given?"

Input: a recording of ``sage-kv-stats listen`` (``observability.shadow``:
Parquet rows of raw vLLM batches). Output: the canonical table of
``traces._common`` (first six columns), which ``sim.replay_sequential`` and
every sweep replay under any policy and capacity.

What events say about requests: vLLM publishes ``BlockStored`` for blocks it
computed and cached, in chain order, with the hash of the block before them
(``parent_block_hash``); hits publish nothing. So each ``BlockStored`` becomes
one request whose blocks are the stored blocks' full chain::

    chain = ancestors(parent) ... parent, block_hashes...
    input_length = len(chain) * block_size,  output_length = 0
    arrival_s    = batch ts - the first converted batch's ts

where ancestors are resolved through the parents of every block stored
earlier in the recording (a parent never seen stored is kept as the chain's
first block: its own ancestors are unknown).
``BlockRemoved`` / ``AllBlocksCleared`` are the engine's own evictions and
are not requests: the replay's policy and capacity decide evictions. Not
visible, hence not in the trace: requests that hit every block, and chunks
of one request look like several requests (each chunk after the first
"hits" the earlier ones). Hashes become signed 64-bit ids: an int hash in
[2**63, 2**64) wraps (a bijection), a bytes hash gives its low 64 bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sagellm_kv_cache.errors import KVCacheError, KVConfigError, KVTraceFormatError

from ._common import TraceRecord, records_to_frame, resolve_max_request_tokens

__all__ = ["recording_to_trace"]

_U64 = 1 << 64


def _as_int64(h: Any) -> int:
    if isinstance(h, bytes):
        h = int.from_bytes(h, "big") % _U64
    elif not -(1 << 63) <= h < _U64:  # msgpack ints fit; anything else is not a hash
        raise KVTraceFormatError(f"block hash {h!r:.40} does not fit in 64 bits")
    return h - _U64 if h >= 1 << 63 else h


def recording_to_trace(
    recording: str | Path,
    *,
    endpoint: str | None = None,
    data_parallel_rank: int | None = None,
    medium: str | None = "GPU",
    max_request_tokens: int | None = None,
) -> Any:
    """Convert a recording to the canonical trace table (polars).

    Args:
        recording: a recording directory (or one part file).
        endpoint / data_parallel_rank: the engine to take; may be left out
            when the recording holds only one (endpoint, rank).
        medium: events of this medium only; a null medium (vLLM before the
            field existed) counts as "GPU".
        max_request_tokens: the longest chain (in tokens) a request may have
            (default as every reader: ``traces._common.MAX_REQUEST_TOKENS``).

    Raises:
        KVConfigError: several engines recorded and none chosen, or none matches.
        KVTraceFormatError: an unreadable part or payload, a batch recorded twice
            (same engine, rank and sequence number), or a chain above the maximum;
            the message names ``<part file>:<row>``.
        FileNotFoundError: no recording at ``recording``.
    """
    max_tokens = resolve_max_request_tokens(max_request_tokens)
    rows = _rows(Path(recording))
    engines = sorted({(r["endpoint"], r["data_parallel_rank"]) for r, _, _ in rows}, key=str)
    chosen = [
        e
        for e in engines
        if (endpoint is None or e[0] == endpoint)
        and (data_parallel_rank is None or e[1] == data_parallel_rank)
    ]
    if not chosen:
        raise KVConfigError(
            f"no recorded engine matches endpoint {endpoint!r}, rank {data_parallel_rank!r} "
            f"(recorded: {engines})"
        )
    if len(chosen) > 1:
        raise KVConfigError(
            f"the recording holds engines {chosen}; choose one with endpoint= and "
            "data_parallel_rank="
        )
    (ep, rank) = chosen[0]
    parents: dict[int, int | None] = {}
    records: list[TraceRecord] = []
    t0: float | None = None
    seen_seq: set[int] = set()
    for row, batch, where in rows:
        if (row["endpoint"], row["data_parallel_rank"]) != (ep, rank):
            continue
        if row["seq"] in seen_seq:
            raise _bad(
                where,
                "seq",
                f"batch {row['seq']} of {ep}#{rank} recorded twice (a publisher restart "
                "starts again at 0: convert the parts before and after it separately)",
            )
        seen_seq.add(row["seq"])
        for i, ev in enumerate(batch.events):
            if type(ev).__name__ != "BlockStored" or (ev.medium or "GPU") != (medium or "GPU"):
                continue
            if not ev.block_hashes:
                continue
            bs = ev.block_size
            if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
                raise _bad(where, "block_size", f"must be a positive integer, got {bs!r}")
            max_blocks = max_tokens // bs
            if t0 is None:
                t0 = batch.ts
            prefix: list[int] = []
            p = None if ev.parent_block_hash is None else _as_int64(ev.parent_block_hash)
            # bounded: a hash collision cannot loop, a long chain stops at the maximum
            for _ in range(min(len(parents), max_blocks) + 1):
                if p is None:
                    break
                prefix.append(p)
                p = parents.get(p)
            if len(prefix) + len(ev.block_hashes) > max_blocks:
                raise _bad(
                    where,
                    "block_hashes",
                    f"a chain of more than {max_blocks} blocks of {bs} tokens is above "
                    f"the per-request maximum of {max_tokens} tokens",
                )
            chain = prefix[::-1]
            prev = chain[-1] if chain else None
            for h in ev.block_hashes:
                h = _as_int64(h)
                parents.setdefault(h, prev)
                chain.append(h)
                prev = h
            records.append(
                TraceRecord(
                    request_id=f"{ep}#{rank}:{row['seq']}.{i}",
                    arrival_s=max(0.0, batch.ts - t0),
                    input_length=len(chain) * ev.block_size,
                    output_length=0,
                    block_hashes=chain,
                    block_size=ev.block_size,
                )
            )
    return records_to_frame(records, with_sessions=False)


def _bad(where: tuple[Path, int], field: str, msg: str) -> KVTraceFormatError:
    part, row = where
    return KVTraceFormatError(
        f"{part.name}:{row}: field {field!r}: {msg}", path=str(part), line=row, field=field
    )


def _rows(path: Path) -> list[tuple[dict, Any, tuple[Path, int]]]:
    """``(row, decoded batch, (part file, 1-based row))`` of every recorded batch."""
    import pyarrow.parquet as pq

    from sagellm_kv_cache.observability.shadow import RECORDING_COLUMNS
    from sagellm_kv_cache.observability.vllm_wire import decode_batch

    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        if not parts:
            raise FileNotFoundError(f"no .parquet recording parts in {path}")
    elif path.exists():
        parts = [path]
    else:
        raise FileNotFoundError(f"recording not found: {path}")
    out = []
    for part in parts:
        try:
            table = pq.read_table(part, columns=list(RECORDING_COLUMNS))
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, KeyError...
            raise _bad((part, 0), "<parquet>", f"not a readable recording part ({exc})") from None
        cols = {name: table.column(name).to_pylist() for name in RECORDING_COLUMNS}
        payloads = cols.pop("payload")
        for i, payload in enumerate(payloads):
            row = {name: values[i] for name, values in cols.items()}
            where = (part, i + 1)
            if not isinstance(row["seq"], int) or not isinstance(payload, bytes):
                raise _bad(where, "payload", "a row without a sequence number or payload")
            try:
                batch = decode_batch(payload)
            except KVCacheError as err:
                raise _bad(where, "payload", err.message) from None
            out.append((row, batch, where))
    return out
