"""KV events: what a KV-aware router needs to mirror a pool's cache contents.

``KVEventStream`` is a pool hook that publishes three kinds of events, each
with a sequence number (1, 2, 3, ... with no holes) and the pool's timestamp::

    BlockStored(block_hashes, parent_block_hash, block_ids, block_size)
        blocks registered in the prefix cache, in chain order; the first
        block's parent is ``parent_block_hash`` (None: a request's first block)
    BlockRemoved(block_hashes, block_ids, reason)
        hashes dropped ("capacity", "explicit" or "clear")
    AllBlocksCleared()
        every hash dropped (pool reset)

Blocks the pool reports one by one are batched: consecutive stored blocks of
one chain become one ``BlockStored``, consecutive drops of one eviction
become one ``BlockRemoved``. A batch is published at the next pool event of
another kind (every request's ``free`` ends one) or when a reader asks
(``events_since``, ``flush``).

Events sit in a bounded ring buffer. A consumer polls ``events_since(seq)``
with the last sequence number it applied; when the buffer has dropped events
it has not seen, ``KVEventGapError`` tells it to resynchronise (start over
from ``AllBlocksCleared`` or ``snapshot_events()``). ``subscribe`` pushes
events to callbacks instead. ``replay`` / ``CacheIndex`` rebuild hash ->
block id from events, which is what a router keeps per worker.

Serialisation is JSON lines: bytes hashes as hex strings, int hashes (trace
ids) as JSON ints. Nothing is pickled, nothing read is evaluated.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import IO, Any, ClassVar

from ..errors import KVEventGapError, KVInvalidInputError, KVInvalidTypeError
from ..hooks import PoolHook

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "CacheIndex",
    "KVEvent",
    "KVEventGapError",
    "KVEventStream",
    "event_from_dict",
    "event_to_dict",
    "events_from_jsonl",
    "events_to_jsonl",
    "replay",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks registered under their hashes, in chain order."""

    seq: int
    timestamp: float
    block_hashes: tuple[Hashable, ...]
    parent_block_hash: Hashable | None
    block_ids: tuple[int, ...]
    block_size: int | None = None
    type: ClassVar[str] = "block_stored"


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Hashes dropped from the cache (their blocks may be reused at once)."""

    seq: int
    timestamp: float
    block_hashes: tuple[Hashable, ...]
    block_ids: tuple[int, ...]
    reason: str = "capacity"
    type: ClassVar[str] = "block_removed"


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every hash dropped (pool reset)."""

    seq: int
    timestamp: float
    type: ClassVar[str] = "all_blocks_cleared"


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

_STORED, _REMOVED = 1, 2


def _materialise(item: Any) -> KVEvent:
    """An event of the ring buffer: kept as a plain tuple ``(kind, seq, ts, hashes,
    parent or reason, ids, block_size)`` until someone reads it (building the frozen
    dataclass costs more than the rest of publishing)."""
    if type(item) is not tuple:
        return item
    kind, seq, ts, hashes, extra, ids, block_size = item
    if kind == _STORED:
        return BlockStored(seq, ts, hashes, extra, ids, block_size)
    return BlockRemoved(seq, ts, hashes, ids, extra)


def _seq_of(item: Any) -> int:
    return item[1] if type(item) is tuple else item.seq


class KVEventStream(PoolHook):
    """Pool hook publishing ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``.

    Args:
        pool: the ``KVPool`` it is attached to (optional: gives ``block_size``
            and ``snapshot_events``). Attach with ``pool.add_hook(stream)``.
        maxlen: events kept in the ring buffer (>= 1).
        block_size: tokens per block stamped on ``BlockStored`` (default: the pool's).

    Thread safety: a ``KVPool`` calls hooks under its lock; reads and
    subscriptions take the same lock when the stream knows the pool, so pass
    ``pool`` when other threads read. Subscribers run on the thread that mutated the pool, inside the pool's
    lock: keep them short. A subscriber that raises is logged and counted
    (``num_callback_errors``); the pool operation is not affected.
    """

    def __init__(
        self, pool: Any = None, *, maxlen: int = 65536, block_size: int | None = None
    ) -> None:
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            raise KVInvalidInputError(f"maxlen must be a positive int, got {maxlen!r}")
        self.pool = pool
        self.maxlen = maxlen
        self.block_size = (
            block_size if block_size is not None else getattr(pool, "block_size", None)
        )
        # events, or tuples standing for them until read (see _materialise)
        self._events: deque[Any] = deque(maxlen=maxlen)
        # Hook calls arrive serialised under the pool's lock and take no lock of
        # their own (the hot path); readers take that same lock.
        self._lock = getattr(pool, "_lock", None) or threading.RLock()
        self._subscribers: list[Callable[[KVEvent], Any]] = []
        self._last_seq = 0
        self.num_callback_errors = 0
        # the batch being built: kind, hashes, ids (tuples, one per hook call),
        # first parent / reason, timestamp
        self._kind = 0
        self._hashes: list[tuple[Hashable, ...]] = []
        self._ids: list[tuple[int, ...]] = []
        self._parent: Hashable | None = None
        self._reason = ""
        self._ts = 0.0

    # -- publishing ----------------------------------------------------------
    def _flush_locked(self) -> None:
        kind = self._kind
        if not kind:
            return
        seq = self._last_seq + 1
        hashes, ids = self._hashes, self._ids
        if len(hashes) == 1:
            hashes, ids = hashes[0], ids[0]
        else:
            hashes, ids = tuple(chain.from_iterable(hashes)), tuple(chain.from_iterable(ids))
        extra = self._parent if kind == _STORED else self._reason
        self._kind = 0
        self._hashes = []
        self._ids = []
        item = (kind, seq, float(self._ts), hashes, extra, ids, self.block_size)
        if self._subscribers:
            self._publish_locked(_materialise(item))
        else:
            self._last_seq = seq
            self._events.append(item)

    def _publish_locked(self, event: KVEvent) -> None:
        self._last_seq = event.seq
        self._events.append(event)
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:
                self.num_callback_errors += 1
                log.exception("KV event subscriber %r failed on event %d", callback, event.seq)

    def flush(self) -> None:
        """Publish the batch being built, if any."""
        with self._lock:
            self._flush_locked()

    # -- pool hook -----------------------------------------------------------
    def on_block_cached(
        self, block_id: int, block_hash: Hashable, parent_hash: Hashable | None, timestamp: float
    ) -> None:
        if self._kind != _STORED or parent_hash != self._hashes[-1][-1]:  # not the same chain
            self._flush_locked()
            self._kind = _STORED
            self._parent = parent_hash
            self._ts = timestamp
        self._hashes.append((block_hash,))
        self._ids.append((block_id,))

    def on_evict(self, block_id: int, block_hash: Hashable, reason: str, timestamp: float) -> None:
        if self._kind != _REMOVED or reason != self._reason or timestamp != self._ts:
            self._flush_locked()
            self._kind = _REMOVED
            self._reason = reason
            self._ts = timestamp
        self._hashes.append((block_hash,))
        self._ids.append((block_id,))

    def on_blocks_cached(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[Hashable],
        parent_hash: Hashable | None,
        timestamp: float,
    ) -> None:
        if not block_ids:
            return
        if self._kind != _STORED or parent_hash != self._hashes[-1][-1]:  # not the same chain
            self._flush_locked()
            self._kind = _STORED
            self._parent = parent_hash
            self._ts = timestamp
        # copies: the caller may reuse its lists before the batch is published
        self._hashes.append(tuple(block_hashes))
        self._ids.append(tuple(block_ids))

    def on_evict_many(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[Hashable],
        reason: str,
        timestamp: float,
    ) -> None:
        if not block_ids:
            return
        if self._kind != _REMOVED or reason != self._reason or timestamp != self._ts:
            self._flush_locked()
            self._kind = _REMOVED
            self._reason = reason
            self._ts = timestamp
        self._hashes.append(tuple(block_hashes))
        self._ids.append(tuple(block_ids))

    def on_cleared(self, timestamp: float) -> None:
        self._flush_locked()
        self._publish_locked(AllBlocksCleared(self._last_seq + 1, float(timestamp)))

    def _end_batch(self, *_: Any) -> None:
        if self._kind:
            self._flush_locked()

    # any other pool event ends a batch, so consumers see it one request later at most
    on_lookup = _end_batch
    on_alloc = _end_batch
    on_free = _end_batch

    # -- reading -------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        """Sequence number of the newest published event (0: none yet)."""
        with self._lock:
            self._flush_locked()
            return self._last_seq

    @property
    def first_seq(self) -> int:
        """Sequence number of the oldest event still buffered (``last_seq + 1`` if none)."""
        with self._lock:
            self._flush_locked()
            return _seq_of(self._events[0]) if self._events else self._last_seq + 1

    def events_since(self, seq: int = 0) -> list[KVEvent]:
        """Events with sequence number > ``seq``, oldest first.

        Args:
            seq: the last sequence number the caller applied (0: from the start).

        Raises:
            KVEventGapError: events after ``seq`` were dropped from the ring
                buffer; the caller must resynchronise.
            KVInvalidInputError: ``seq`` is newer than any event of this stream.
        """
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise KVInvalidInputError(f"seq must be a non-negative int, got {seq!r}")
        with self._lock:
            self._flush_locked()
            if seq > self._last_seq:
                raise KVInvalidInputError(
                    f"seq {seq} is newer than this stream's last event {self._last_seq}"
                )
            events = self._events
            first = _seq_of(events[0]) if events else self._last_seq + 1
            if seq + 1 < first:
                raise KVEventGapError(
                    f"events {seq + 1}..{first - 1} were dropped (ring buffer of {self.maxlen}); "
                    "resynchronise from a snapshot",
                    missing_from=seq + 1,
                    missing_to=first - 1,
                )
            skip = seq + 1 - first
            return [_materialise(events[i]) for i in range(skip, len(events))]

    def subscribe(self, callback: Callable[[KVEvent], Any]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event published from now on.

        Returns:
            a function that unsubscribes the callback.
        """
        if not callable(callback):
            raise KVInvalidTypeError(f"callback must be callable, got {type(callback).__name__}")
        with self._lock:
            self._flush_locked()  # the subscriber starts after what is already published
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def publish_vllm(
        self,
        endpoint: str = "tcp://127.0.0.1:*",
        replay_endpoint: str | None = None,
        *,
        medium: str | None = "GPU",
        int_hashes: bool = True,
        **options: Any,
    ) -> Any:
        """Also publish every event from now on in vLLM's wire format over ZMQ.

        Needs the ``[events]`` extra. Each event becomes one ``KVEventBatch``
        (``ts`` = wall-clock time of publication) on a ``VLLMEventPublisher``
        bound to ``endpoint`` (loopback by default), with a replay ROUTER at
        ``replay_endpoint`` when given. See ``vllm_wire`` for the frames.

        Args:
            medium: vLLM's ``medium`` field of every event.
            int_hashes: bytes hashes as their low 64 bits (vLLM's default).
            options: passed to ``VLLMEventPublisher`` (topic, encoding, ...).

        Returns:
            the publisher; its ``close()`` also unsubscribes it from this stream.
        """
        from .vllm_wire import stream_event_to_vllm
        from .vllm_zmq import VLLMEventPublisher

        publisher = VLLMEventPublisher(endpoint, replay_endpoint, **options)

        def forward(event: KVEvent) -> None:
            publisher.publish([stream_event_to_vllm(event, medium=medium, int_hashes=int_hashes)])

        publisher._on_close.append(self.subscribe(forward))
        return publisher

    def snapshot_events(self) -> list[KVEvent]:
        """The pool's current cache contents as events, for a consumer to resynchronise.

        ``AllBlocksCleared`` followed by one ``BlockStored`` per cached block,
        numbered as if published right after ``last_seq``; the stream itself is
        unchanged. Replaying them gives the pool's ``hash -> block id`` map.
        """
        if self.pool is None:
            raise KVInvalidInputError("snapshot_events needs the stream's pool")
        bp = getattr(self.pool, "block_pool", self.pool)
        with self._lock:
            self._flush_locked()
            seq = self._last_seq
            ts = bp.clock()
            out: list[KVEvent] = [AllBlocksCleared(seq, ts)]
            hashes, parents = bp.block_hashes, bp.parent_ids
            for h, b in bp.cached.items():
                p = parents[b]
                out.append(
                    BlockStored(seq, ts, (h,), hashes[p] if p >= 0 else None, (b,), self.block_size)
                )
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def write_jsonl(self, fp: IO[str], since: int = 0) -> int:
        """Write ``events_since(since)`` to a text file as JSON lines; returns how many."""
        events = self.events_since(since)
        for e in events:
            fp.write(json.dumps(event_to_dict(e), separators=(",", ":")) + "\n")
        return len(events)

    def __repr__(self) -> str:
        return (
            f"KVEventStream(last_seq={self._last_seq}, buffered={len(self._events)}/{self.maxlen})"
        )


# -- consumers ----------------------------------------------------------------
class CacheIndex:
    """A consumer's mirror of one pool's cache: ``hash -> block id``.

    ``apply`` checks that sequence numbers follow each other without holes
    (``KVEventGapError`` otherwise); events of a ``snapshot_events()`` list
    carry the same number and reset the index with their ``AllBlocksCleared``.
    """

    __slots__ = ("_cleared_seq", "blocks", "last_seq")

    def __init__(self) -> None:
        self.blocks: dict[Hashable, int] = {}
        self.last_seq = 0
        self._cleared_seq = 0  # a snapshot's stored blocks repeat its clear's number

    def apply(self, event: KVEvent) -> None:
        """Apply one event. Raises ``KVEventGapError`` when events are missing before it."""
        seq = event.seq
        if isinstance(event, AllBlocksCleared):
            self.blocks.clear()
            self._cleared_seq = seq
        elif seq != self.last_seq + 1 and not (seq == self.last_seq == self._cleared_seq):
            raise KVEventGapError(
                f"event {seq} follows {self.last_seq}: events in between are missing",
                missing_from=self.last_seq + 1,
                missing_to=seq - 1,
            )
        elif isinstance(event, BlockStored):
            self.blocks.update(zip(event.block_hashes, event.block_ids))
        elif isinstance(event, BlockRemoved):
            pop = self.blocks.pop
            for h in event.block_hashes:
                pop(h, None)
        else:
            raise KVInvalidTypeError(f"not a KV event: {type(event).__name__}")
        self.last_seq = seq

    def apply_many(self, events: Iterable[KVEvent]) -> None:
        for e in events:
            self.apply(e)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __call__(self, event: KVEvent) -> None:  # usable as a subscriber
        self.apply(event)


def replay(events: Iterable[KVEvent]) -> dict[Hashable, int]:
    """Rebuild ``hash -> block id`` from a gap-free event sequence (from seq 1
    or starting with ``AllBlocksCleared``)."""
    index = CacheIndex()
    index.apply_many(events)
    return index.blocks


# -- JSON lines ---------------------------------------------------------------
def _enc_hash(h: Any) -> Any:
    if isinstance(h, bytes):
        return h.hex()
    if isinstance(h, int) and not isinstance(h, bool):
        return h
    if h is None:
        return None
    raise KVInvalidTypeError(f"block hash of type {type(h).__name__} has no JSON encoding")


def _dec_hash(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return bytes.fromhex(v)
        except ValueError:
            raise KVInvalidInputError(f"block hash {v!r} is not hex") from None
    if (isinstance(v, int) and not isinstance(v, bool)) or v is None:
        return v
    raise KVInvalidInputError(f"block hash {v!r} is neither a hex string nor an int")


def event_to_dict(event: KVEvent) -> dict[str, Any]:
    """JSON-ready dict of an event (bytes hashes as hex)."""
    d: dict[str, Any] = {"type": event.type, "seq": event.seq, "ts": event.timestamp}
    if isinstance(event, BlockStored):
        d["block_hashes"] = [_enc_hash(h) for h in event.block_hashes]
        d["parent_block_hash"] = _enc_hash(event.parent_block_hash)
        d["block_ids"] = list(event.block_ids)
        d["block_size"] = event.block_size
    elif isinstance(event, BlockRemoved):
        d["block_hashes"] = [_enc_hash(h) for h in event.block_hashes]
        d["block_ids"] = list(event.block_ids)
        d["reason"] = event.reason
    return d


def _int_field(d: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    v = d.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise KVInvalidInputError(f"event field {key!r} must be an int, got {v!r}")
    return v


def _ids(d: dict[str, Any], n: int) -> tuple[int, ...]:
    ids = d.get("block_ids")
    if not isinstance(ids, list) or len(ids) != n:
        raise KVInvalidInputError(f"event needs {n} block_ids, got {ids!r}")
    for b in ids:
        if isinstance(b, bool) or not isinstance(b, int):
            raise KVInvalidInputError(f"block id {b!r} is not an int")
    return tuple(ids)


def event_from_dict(d: dict[str, Any]) -> KVEvent:
    """Inverse of ``event_to_dict``; validates every field.

    Raises:
        KVInvalidInputError: unknown type or a malformed field.
    """
    if not isinstance(d, dict):
        raise KVInvalidInputError(f"an event is a JSON object, got {type(d).__name__}")
    kind = d.get("type")
    seq = _int_field(d, "seq")
    ts = d.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise KVInvalidInputError(f"event field 'ts' must be a number, got {ts!r}")
    ts = float(ts)
    if kind == AllBlocksCleared.type:
        return AllBlocksCleared(seq, ts)
    if kind not in (BlockStored.type, BlockRemoved.type):
        raise KVInvalidInputError(f"unknown event type {kind!r}")
    raw = d.get("block_hashes")
    if not isinstance(raw, list):
        raise KVInvalidInputError(f"event field 'block_hashes' must be a list, got {raw!r}")
    hashes = tuple(_dec_hash(h) for h in raw)
    if None in hashes:
        raise KVInvalidInputError("a block hash is null")
    ids = _ids(d, len(hashes))
    if kind == BlockStored.type:
        return BlockStored(
            seq,
            ts,
            hashes,
            _dec_hash(d.get("parent_block_hash")),
            ids,
            _int_field(d, "block_size", optional=True),
        )
    reason = d.get("reason")
    if not isinstance(reason, str):
        raise KVInvalidInputError(f"event field 'reason' must be a string, got {reason!r}")
    return BlockRemoved(seq, ts, hashes, ids, reason)


def events_to_jsonl(events: Iterable[KVEvent]) -> str:
    """One compact JSON object per line (a trailing newline after each)."""
    dumps = json.dumps
    return "".join(dumps(event_to_dict(e), separators=(",", ":")) + "\n" for e in events)


def events_from_jsonl(lines: str | Iterable[str]) -> list[KVEvent]:
    """Parse JSON lines back into events (blank lines skipped).

    Raises:
        KVInvalidInputError: a line is not JSON or not a valid event (its line number given).
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    out: list[KVEvent] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KVInvalidInputError(f"line {i}: not JSON ({exc.msg})") from None
        try:
            out.append(event_from_dict(d))
        except KVInvalidInputError as exc:
            raise KVInvalidInputError(f"line {i}: {exc.message}") from None
    return out
