"""What a KV-event consumer keeps: a shadow of each engine's cache, and a recording.

``ShadowCache`` applies vLLM events (``vllm_wire``) per key
``(endpoint, data_parallel_rank, medium)`` and holds the set of block hashes
each key holds, which is what a KV-aware router indexes. ``AllBlocksCleared``
carries no medium in vLLM's schema and clears every medium of its
``(endpoint, rank)``. A ``BlockRemoved`` of a hash the shadow does not hold is
counted (``removed_unknown``), not an error: a consumer that joined late never
saw the store.

What events can tell about hits: vLLM publishes ``BlockStored`` only for
blocks newly computed and cached; a prefix-cache hit publishes nothing. A
stored chain whose ``parent_block_hash`` is held says the request reused that
parent's whole chain (``depth`` blocks), so

    implied_hit_blocks   += depth(parent)                      per BlockStored
    implied_query_blocks += depth(parent) + len(block_hashes)

and ``implied_hit_blocks / implied_query_blocks`` is an *event-implied* block
hit ratio. It counts a chunked prefill's second chunk as reusing its first
chunk and misses requests that hit every block (they publish nothing): a
view of reuse among requests that computed something, not the engine's own
``vllm:prefix_cache_hits``. ``restored_blocks`` counts stores of hashes the
key already holds (duplicate computation).

``EventRecorder`` writes every applied batch losslessly: its raw msgpack
payload with arrival time, endpoint, topic and sequence number, as Parquet
part files of ``flush_rows`` rows (a killed listener loses at most the
unflushed rows; memory holds at most ``flush_rows`` payloads).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

from ..errors import KVConfigError, KVInvalidInputError
from .vllm_wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, decode_batch

__all__ = ["RECORDING_COLUMNS", "EventRecorder", "ShadowCache", "iter_recording", "read_recording"]

ShadowKey = tuple[str, int | None, str | None]


class ShadowCache:
    """Block hashes held per ``(endpoint, data_parallel_rank, medium)``, from events.

    Thread safety: ``apply_batch`` and the readers take one lock, so a
    metrics scrape from another thread sees whole batches.
    """

    def __init__(self) -> None:
        # key -> {hash: chain depth}; depth 1 for a block whose parent is unknown
        self._held: dict[ShadowKey, dict[Hashable, int]] = {}
        self.lock = threading.Lock()
        #: endpoints that lost events (their shadow may differ from the engine)
        self.stale: set[str] = set()
        self.stored_blocks = self.restored_blocks = 0
        self.removed_blocks = self.removed_unknown = self.clears = 0
        self.implied_hit_blocks = self.implied_query_blocks = 0
        self.implied_hit_tokens = self.implied_query_tokens = 0

    def apply_batch(self, endpoint: str, batch: KVEventBatch) -> None:
        """Apply every event of ``batch`` published by ``endpoint``."""
        rank = batch.data_parallel_rank
        with self.lock:
            for event in batch.events:
                if isinstance(event, BlockStored):
                    self._stored(self._get((endpoint, rank, event.medium)), event)
                elif isinstance(event, BlockRemoved):
                    held = self._get((endpoint, rank, event.medium))
                    for h in event.block_hashes:
                        if held.pop(h, None) is None:
                            self.removed_unknown += 1
                        else:
                            self.removed_blocks += 1
                elif isinstance(event, AllBlocksCleared):
                    self.clears += 1
                    for key, held in self._held.items():
                        if key[0] == endpoint and key[1] == rank:
                            held.clear()
                else:  # decode_batch never yields anything else
                    raise KVInvalidInputError(f"not a vLLM KV event: {type(event).__name__}")

    def _get(self, key: ShadowKey) -> dict[Hashable, int]:
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = {}
        return held

    def _stored(self, held: dict[Hashable, int], event: BlockStored) -> None:
        parent = event.parent_block_hash
        depth = held.get(parent, 0) if parent is not None else 0
        n = len(event.block_hashes)
        self.implied_hit_blocks += depth
        self.implied_query_blocks += depth + n
        self.implied_hit_tokens += depth * event.block_size
        self.implied_query_tokens += (depth + n) * event.block_size
        for h in event.block_hashes:
            depth += 1
            if h in held:
                self.restored_blocks += 1
            else:
                self.stored_blocks += 1
            held[h] = depth

    def mark_stale(self, endpoint: str) -> None:
        """Events of ``endpoint`` were lost: its shadow may differ from the engine."""
        with self.lock:
            self.stale.add(endpoint)

    def reset_endpoint(self, endpoint: str) -> None:
        """Forget everything about ``endpoint`` (its publisher restarted)."""
        with self.lock:
            for key in [k for k in self._held if k[0] == endpoint]:
                del self._held[key]
            self.stale.discard(endpoint)

    # -- reading -------------------------------------------------------------
    def keys(self) -> list[ShadowKey]:
        with self.lock:
            return list(self._held)

    def blocks(self, endpoint: str, rank: int | None = 0, medium: str | None = "GPU") -> set:
        """The hashes ``(endpoint, rank, medium)`` holds (a new set)."""
        with self.lock:
            return set(self._held.get((endpoint, rank, medium), ()))

    def sizes(self) -> dict[ShadowKey, int]:
        """Key -> number of held blocks."""
        with self.lock:
            return {k: len(v) for k, v in self._held.items()}

    @property
    def num_blocks(self) -> int:
        with self.lock:
            return sum(map(len, self._held.values()))

    @property
    def implied_block_hit_ratio(self) -> float:
        q = self.implied_query_blocks
        return self.implied_hit_blocks / q if q else 0.0

    def __repr__(self) -> str:
        return f"ShadowCache(keys={len(self._held)}, blocks={self.num_blocks})"


# -- recording ------------------------------------------------------------------
#: Column name -> meaning of a recording (one row per applied batch).
RECORDING_COLUMNS = {
    "arrival_s": "float64: wall-clock seconds (time.time()) when the batch was received",
    "endpoint": "utf8: the PUB endpoint it came from",
    "topic": "binary: the ZMQ topic frame",
    "seq": "int64: the publisher's sequence number",
    "replayed": "bool: received through the replay socket (a gap repair)",
    "batch_ts": "float64: the batch's own ts",
    "data_parallel_rank": "int64, null: the batch's data_parallel_rank",
    "num_events": "int64: events in the batch",
    "payload": "binary: the msgpack payload, byte for byte",
}


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("arrival_s", pa.float64()),
            ("endpoint", pa.string()),
            ("topic", pa.binary()),
            ("seq", pa.int64()),
            ("replayed", pa.bool_()),
            ("batch_ts", pa.float64()),
            ("data_parallel_rank", pa.int64()),
            ("num_events", pa.int64()),
            ("payload", pa.binary()),
        ]
    )


class EventRecorder:
    """Append batches to ``out_dir/<prefix>-NNNNN.parquet`` part files.

    Args:
        out_dir: directory (created); existing parts of the same prefix are
            not overwritten: numbering continues after them.
        flush_rows: rows buffered before a part is written (>= 1).
        prefix: file name prefix.
    """

    def __init__(self, out_dir: str | Path, *, flush_rows: int = 4096, prefix: str = "events"):
        if isinstance(flush_rows, bool) or not isinstance(flush_rows, int) or flush_rows < 1:
            raise KVConfigError(f"flush_rows must be a positive int, got {flush_rows!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.flush_rows = flush_rows
        self.prefix = prefix
        self._cols: dict[str, list] = {name: [] for name in RECORDING_COLUMNS}
        existing = sorted(self.out_dir.glob(f"{prefix}-*.parquet"))
        self._next_part = len(existing)
        self.num_rows = 0
        self.parts: list[Path] = []

    def add(
        self,
        *,
        arrival_s: float,
        endpoint: str,
        topic: bytes,
        seq: int,
        replayed: bool,
        batch: KVEventBatch,
        payload: bytes,
    ) -> None:
        c = self._cols
        c["arrival_s"].append(arrival_s)
        c["endpoint"].append(endpoint)
        c["topic"].append(topic)
        c["seq"].append(seq)
        c["replayed"].append(replayed)
        c["batch_ts"].append(batch.ts)
        c["data_parallel_rank"].append(batch.data_parallel_rank)
        c["num_events"].append(len(batch.events))
        c["payload"].append(payload)
        self.num_rows += 1
        if len(c["seq"]) >= self.flush_rows:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered rows as one part file (None if nothing buffered)."""
        if not self._cols["seq"]:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(self._cols, schema=_schema())
        while True:  # never overwrite a part another recorder wrote meanwhile
            path = self.out_dir / f"{self.prefix}-{self._next_part:05d}.parquet"
            self._next_part += 1
            if not path.exists():
                break
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)  # a reader never sees a half-written part
        self.parts.append(path)
        self._cols = {name: [] for name in RECORDING_COLUMNS}
        return path

    def close(self) -> None:
        self.flush()


def _parts(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        parts = sorted(p.glob("*.parquet"))
        if not parts:
            raise FileNotFoundError(f"no .parquet recording parts in {p}")
        return parts
    if not p.exists():
        raise FileNotFoundError(f"recording not found: {p}")
    return [p]


def read_recording(path: str | Path) -> Any:
    """A recording (directory of parts or one part) as one pyarrow Table, in write order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f, schema=_schema()) for f in _parts(path)])


def iter_recording(path: str | Path) -> Iterator[tuple[dict[str, Any], KVEventBatch]]:
    """``(row without payload, decoded batch)`` per recorded batch, in write order."""
    import pyarrow.parquet as pq

    for f in _parts(path):
        table = pq.read_table(f, schema=_schema())
        cols = {name: table.column(name).to_pylist() for name in RECORDING_COLUMNS}
        payloads = cols.pop("payload")
        for i, payload in enumerate(payloads):
            yield {name: values[i] for name, values in cols.items()}, decode_batch(payload)
