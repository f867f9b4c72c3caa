"""KV events: what a KV-aware router needs to mirror a pool's cache contents.

``KVEventStream`` is a pool hook that publishes ``BlockStored``,
``BlockRemoved`` and ``AllBlocksCleared`` (:mod:`.event_types`), each with a
sequence number (1, 2, 3, ... with no holes) and the pool's timestamp.

Blocks the pool reports one by one are batched: consecutive stored blocks of
one chain become one ``BlockStored``, consecutive drops of one eviction
become one ``BlockRemoved``. A batch is published at the next pool event of
another kind (every request's ``free`` ends one) or when a reader asks
(``events_since``, ``flush``).

Events sit in a bounded ring buffer. A consumer polls ``events_since(seq)``
with the last sequence number it applied; when the buffer has dropped events
it has not seen, ``KVEventGapError`` tells it to resynchronise (start over
from ``AllBlocksCleared`` or ``snapshot_events()``). ``subscribe`` pushes
events to callbacks instead. ``replay`` / ``CacheIndex`` (:mod:`.event_index`)
rebuild hash -> block id from events, which is what a router keeps per
worker; :mod:`.event_json` writes and reads them as JSON lines.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from itertools import chain
from typing import IO, Any

from ..errors import KVEventGapError, KVInvalidInputError, KVInvalidTypeError
from ..hooks import PoolHook
from .event_json import event_to_dict
from .event_types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["KVEventGapError", "KVEventStream"]

log = logging.getLogger(__name__)


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
        parts = self._hashes
        if len(parts) == 1:
            hashes, ids = parts[0], self._ids[0]
        else:
            hashes, ids = tuple(chain.from_iterable(parts)), tuple(chain.from_iterable(self._ids))
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
    def _add(
        self, kind: int, key: Any, hashes: tuple[Hashable, ...], ids: tuple[int, ...], ts: float
    ) -> None:
        """Add to the batch being built, or start a new one: stored blocks join it while
        they continue its chain (``key``: their parent), drops while they share its
        reason and time (``key``: the reason)."""
        if kind != self._kind or (
            key != self._hashes[-1][-1]
            if kind == _STORED
            else key != self._reason or ts != self._ts
        ):
            self._flush_locked()
            self._kind = kind
            if kind == _STORED:
                self._parent = key
            else:
                self._reason = key
            self._ts = ts
        self._hashes.append(hashes)
        self._ids.append(ids)

    def on_block_cached(self, block_id, block_hash, parent_hash, timestamp) -> None:
        self._add(_STORED, parent_hash, (block_hash,), (block_id,), timestamp)

    def on_evict(self, block_id, block_hash, reason, timestamp) -> None:
        self._add(_REMOVED, reason, (block_hash,), (block_id,), timestamp)

    def on_blocks_cached(self, block_ids, block_hashes, parent_hash, timestamp) -> None:
        # copies: the caller may reuse its lists before the batch is published
        if block_ids:
            self._add(_STORED, parent_hash, tuple(block_hashes), tuple(block_ids), timestamp)

    def on_evict_many(self, block_ids, block_hashes, reason, timestamp) -> None:
        if block_ids:
            self._add(_REMOVED, reason, tuple(block_hashes), tuple(block_ids), timestamp)

    def on_cleared(self, timestamp) -> None:
        self._flush_locked()
        self._publish_locked(AllBlocksCleared(self._last_seq + 1, float(timestamp)))

    # any other pool event ends a batch, so consumers see it one request later at most
    # (a lookup is always followed by its allocation: on_alloc ends the batch then)
    def on_alloc(self, handle, timestamp) -> None:
        if self._kind:
            self._flush_locked()

    def on_free(self, handle, timestamp) -> None:
        if self._kind:
            self._flush_locked()

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
