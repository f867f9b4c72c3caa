"""``VLLMEventSubscriber``: vLLM's KV events over ZMQ (SUB + DEALER, frames in
``vllm_zmq`` and ``vllm_wire``), applied in sequence order to a
``ShadowCache`` (and an ``EventRecorder``):

* a hole in the sequence is repaired at once through the replay socket; what
  the replay buffer no longer has is an unrecovered gap: counted, the
  endpoint marked stale, and with ``on_gap="raise"`` a ``KVEventGapError``
  raised after the batch that revealed it was applied (the subscriber stays
  usable);
* frames that are not ``[topic, 8-byte seq, msgpack batch]`` are garbage:
  counted and skipped before any state changes; a decodable batch numbered
  beyond the publisher's newest (per its replay answer) is garbage too;
* a live sequence number going backwards means the publisher restarted: the
  endpoint's shadow is dropped and numbering starts over.

Memory bound under a flood: the subscriber keeps no queue of its own. ZMQ
holds at most ``rcvhwm`` undelivered batches for it (the publisher drops
beyond that, and the drops surface as gaps, repaired or counted), each at
most ``max_message_bytes`` (``ZMQ_MAXMSGSIZE``: a larger message drops that
connection, which ZMQ re-establishes); a replay answer is bounded by the
publisher's buffer. So at most ``rcvhwm * max_message_bytes`` bytes queue in
ZMQ (defaults 10,000 x 4 MiB), plus the recorder's ``flush_rows`` payloads.
Every wait has a timeout; sockets are closed with ``close()`` (or ``with``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from .._closing import Closing
from ..errors import KVConfigError, KVEventGapError, KVInvalidInputError
from .shadow import EventRecorder, ShadowCache
from .vllm_wire import KVEventBatch, decode_batch, pack_seq, unpack_seq
from .vllm_zmq import check_endpoint

__all__ = ["VLLMEventSubscriber"]

log = logging.getLogger(__name__)
_MAX_KEPT_GAPS = 100


class VLLMEventSubscriber(Closing):
    """Subscribe to one vLLM KV-event publisher; keep its shadow cache; record.

    Args:
        endpoint: the publisher's PUB endpoint (connected, not bound).
        replay_endpoint: its ROUTER replay endpoint; None: gaps cannot be repaired.
        topic: subscription prefix (vLLM's ``topic``; "" takes everything).
        shadow: the ``ShadowCache`` to apply batches to (a new one if None).
        recorder: an ``EventRecorder`` that receives every applied batch.
        start_seq: first sequence number wanted; a first batch numbered after
            it is a gap to repair (None: start wherever the stream is).
        on_gap: "count" (record unrecovered gaps) or "raise" (also raise
            ``KVEventGapError`` from ``poll``).
        replay_timeout_s: longest wait for one replay answer.
        rcvhwm / max_message_bytes: the memory bound (module doc).
        on_batch: ``callback(seq, batch)`` after each applied batch.
    """

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        topic: str = "",
        shadow: ShadowCache | None = None,
        recorder: EventRecorder | None = None,
        start_seq: int | None = None,
        on_gap: str = "count",
        replay_timeout_s: float = 5.0,
        rcvhwm: int = 10_000,
        max_message_bytes: int = 4 << 20,
        on_batch: Callable[[int, KVEventBatch], Any] | None = None,
        context: Any = None,
    ) -> None:
        self.endpoint = check_endpoint(endpoint, "endpoint")
        if replay_endpoint is not None:
            check_endpoint(replay_endpoint, "replay_endpoint")
        if on_gap not in ("count", "raise"):
            raise KVConfigError(f"on_gap must be 'count' or 'raise', got {on_gap!r}")
        self.replay_endpoint = replay_endpoint
        self.shadow = ShadowCache() if shadow is None else shadow
        self.recorder = recorder
        self.start_seq = start_seq
        self.on_gap = on_gap
        self.replay_timeout_s = replay_timeout_s
        self.on_batch = on_batch
        self._ctx = context or zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sub.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
        self._sub.connect(endpoint)
        self._dealer: Any = None
        self.last_seq: int | None = None  # newest applied
        self._live_last = -1  # newest seen live (restart detection)
        self._error: KVEventGapError | None = None
        # counters
        self.num_batches = self.num_events = self.num_garbage = self.num_duplicates = 0
        self.num_gaps = self.num_gaps_repaired = self.num_gaps_unrecovered = 0
        self.num_replayed_batches = self.num_restarts = 0
        self.gaps: list[tuple[int, int]] = []  # unrecovered ranges, first 100 kept

    # -- receiving -----------------------------------------------------------
    def poll(self, timeout_s: float = 0.1, max_messages: int = 10_000) -> int:
        """Wait up to ``timeout_s`` for a message, then handle what is queued.

        Returns:
            batches applied by this call.

        Raises:
            KVEventGapError: ``on_gap="raise"`` and batches were lost for good
                (the batches after them were applied; poll again to go on).
        """
        before = self.num_batches
        if self._sub.poll(max(timeout_s, 0.0) * 1000, zmq.POLLIN):
            for _ in range(max_messages):
                try:
                    frames = self._sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_live(frames)
        err, self._error = self._error, None
        if err is not None:
            raise err
        return self.num_batches - before

    def run(
        self,
        *,
        duration_s: float | None = None,
        max_batches: int | None = None,
        on_tick: Callable[[VLLMEventSubscriber], Any] | None = None,
        tick_s: float = 1.0,
        idle_catch_up_s: float = 1.0,
        stop: threading.Event | None = None,
    ) -> None:
        """Poll until ``duration_s`` passed, ``max_batches`` applied or ``stop`` set.

        ``on_tick(self)`` runs at most once per ``tick_s``; ``catch_up()`` after
        ``idle_catch_up_s`` without a batch. Unrecovered gaps are counted
        (never raised here: a listener does not stop).
        """
        start = last_tick = last_batch = time.monotonic()
        first = self.num_batches
        while True:
            now = time.monotonic()
            if duration_s is not None and now - start >= duration_s:
                break
            if max_batches is not None and self.num_batches - first >= max_batches:
                break
            if stop is not None and stop.is_set():
                break
            wait = 0.1 if duration_s is None else max(0.0, min(0.1, duration_s - (now - start)))
            try:
                if self.poll(wait, max_messages=1 if max_batches is not None else 10_000):
                    last_batch = time.monotonic()
                elif time.monotonic() - last_batch >= idle_catch_up_s:
                    last_batch = time.monotonic()
                    self.catch_up()
                    err, self._error = self._error, None
                    if err is not None:
                        raise err
            except KVEventGapError as exc:
                log.warning("%s", exc)
            if on_tick is not None and time.monotonic() - last_tick >= tick_s:
                last_tick = time.monotonic()
                on_tick(self)

    def _decode(self, frames: list[bytes]) -> tuple[int, KVEventBatch] | None:
        """(seq, batch) of a well-formed live message, else None (counted as garbage)."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self.num_garbage += 1
            return None
        seq = unpack_seq(frames[1])
        try:
            batch = decode_batch(frames[2])
        except KVInvalidInputError:
            self.num_garbage += 1
            return None
        if seq < 0:
            self.num_garbage += 1
            return None
        return seq, batch

    def _on_live(self, frames: list[bytes]) -> None:
        decoded = self._decode(frames)
        if decoded is None:
            return
        seq, batch = decoded
        prev_live = self._live_last
        if seq <= prev_live:  # live numbers only grow: the publisher restarted
            self.num_restarts += 1
            self.shadow.reset_endpoint(self.endpoint)
            self.last_seq = None
        self._live_last = seq
        if self.last_seq is None:
            if self.start_seq is None or seq <= self.start_seq:
                self._apply(seq, batch, frames, replayed=False)
                return
            self.last_seq = self.start_seq - 1
        if seq <= self.last_seq:
            self.num_duplicates += 1  # already applied from a replay
            return
        if seq > self.last_seq + 1:
            lost_before = self.num_gaps_unrecovered
            newest = self._repair(seq)
            if newest is not None and seq > newest:
                # numbered beyond anything the publisher has: not its message
                self.num_garbage += 1
                self._live_last = prev_live
                return
            self.num_gaps += 1
            if self.last_seq < seq - 1:
                self._lost(self.last_seq + 1, seq - 1)
                self.last_seq = seq - 1
            if self.num_gaps_unrecovered == lost_before:
                self.num_gaps_repaired += 1
            if seq <= self.last_seq:
                self.num_duplicates += 1
                return
        self._apply(seq, batch, frames, replayed=False)

    def _lost(self, missing_from: int, missing_to: int) -> None:
        self.num_gaps_unrecovered += 1
        if len(self.gaps) < _MAX_KEPT_GAPS:
            self.gaps.append((missing_from, missing_to))
        self.shadow.mark_stale(self.endpoint)
        if self.on_gap == "raise" and self._error is None:
            self._error = KVEventGapError(
                f"{self.endpoint}: batches {missing_from}..{missing_to} are lost "
                "(not in the publisher's replay buffer); the shadow cache may differ",
                missing_from=missing_from,
                missing_to=missing_to,
            )

    def _apply(self, seq: int, batch: KVEventBatch, frames: list[bytes], *, replayed: bool) -> None:
        self.shadow.apply_batch(self.endpoint, batch)
        self.last_seq = seq
        self.num_batches += 1
        self.num_events += len(batch.events)
        if replayed:
            self.num_replayed_batches += 1
        if self.recorder is not None:
            self.recorder.add(
                arrival_s=time.time(),
                endpoint=self.endpoint,
                topic=bytes(frames[0]),
                seq=seq,
                replayed=replayed,
                batch=batch,
                payload=bytes(frames[-1]),
            )
        if self.on_batch is not None:
            self.on_batch(seq, batch)

    # -- replay ----------------------------------------------------------------
    def catch_up(self) -> int:
        """Ask the replay socket for anything after ``last_seq`` (no live batch needed).

        vLLM's protocol shows a lost batch only when a later one arrives; a
        flood whose tail was dropped leaves nothing to reveal it. ``run`` calls
        this after ``idle_catch_up_s`` without batches.

        Returns:
            batches applied (each run of them counts as one repaired gap).
        """
        if self.last_seq is None and self.start_seq is not None:
            self.last_seq = self.start_seq - 1  # nothing live yet: start where asked
        if self.replay_endpoint is None or self.last_seq is None:
            return 0
        before, lost_before = self.num_batches, self.num_gaps_unrecovered
        self._repair(1 << 62)
        applied = self.num_batches - before
        if applied:
            self.num_gaps += 1
            if self.num_gaps_unrecovered == lost_before:
                self.num_gaps_repaired += 1
        return applied

    def _applied(self) -> int:
        """``last_seq`` where a batch was applied or a start set (replay runs only then)."""
        last = self.last_seq
        assert last is not None, "replay before any applied batch or start_seq"
        return last

    def _repair(self, upto: int) -> int | None:
        """Replay from ``last_seq + 1`` until ``upto`` is applied or no progress is made.

        A round whose answer lost a middle or tail part (a ROUTER drops what
        exceeds its high-water mark) is followed by another from where it
        stopped; only an answer that starts after the wanted number proves
        batches gone (``_lost``).

        Returns:
            the newest sequence number the publisher reported (-1: its buffer is
            empty; None: no replay socket or no answer in time).
        """
        if self.replay_endpoint is None:
            return None
        newest: int | None = None
        while newest is None or newest < upto:
            before = self._applied()
            answer = self._replay_round(before + 1)
            if answer is None:
                break
            newest = answer if newest is None else max(newest, answer)
            if self.last_seq == before:  # nothing applied: nothing more to get
                break
        return newest

    def _replay_round(self, start: int) -> int | None:
        """One replay request; applies the answer's leading run of consecutive batches."""
        if self._dealer is None:
            self._dealer = self._ctx.socket(zmq.DEALER)
            self._dealer.setsockopt(zmq.LINGER, 0)
            self._dealer.connect(self.replay_endpoint)
        dealer = self._dealer
        dealer.send_multipart((b"", pack_seq(start)))
        deadline = time.monotonic() + self.replay_timeout_s
        newest = -1
        first = True
        broken = False  # a hole inside the answer: apply nothing more from it
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not dealer.poll(remaining * 1000, zmq.POLLIN):
                # no end marker in time: drop the socket so late answers cannot mix in
                dealer.close(linger=0)
                self._dealer = None
                log.warning("%s: replay from %d timed out", self.replay_endpoint, start)
                return None
            frames = dealer.recv_multipart()
            if len(frames) != 3 or frames[0] != b"" or len(frames[1]) != 8:
                self.num_garbage += 1
                continue
            seq = unpack_seq(frames[1])
            if seq == -1:  # the end marker
                return newest
            newest = max(newest, seq)
            was_first, first = first, False
            if broken or seq <= self._applied():
                continue
            try:
                batch = decode_batch(frames[2])
            except KVInvalidInputError:
                self.num_garbage += 1
                broken = True
                continue
            if seq > self._applied() + 1:
                if not was_first:  # lost in transit: ask again from last_seq + 1
                    broken = True
                    continue
                self._lost(self._applied() + 1, seq - 1)  # the buffer starts after them
            self._apply(seq, batch, frames, replayed=True)

    # -- lifetime ----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters and shadow figures as a plain dict."""
        sh = self.shadow
        return {
            "endpoint": self.endpoint,
            "last_seq": self.last_seq,
            "batches": self.num_batches,
            "events": self.num_events,
            "garbage_frames": self.num_garbage,
            "duplicate_batches": self.num_duplicates,
            "gaps": self.num_gaps,
            "gaps_repaired": self.num_gaps_repaired,
            "gaps_unrecovered": self.num_gaps_unrecovered,
            "replayed_batches": self.num_replayed_batches,
            "restarts": self.num_restarts,
            "shadow_blocks": sh.num_blocks,
            "implied_block_hit_ratio": sh.implied_block_hit_ratio,
        }

    def close(self) -> None:
        """Close both sockets (and flush the recorder)."""
        self._sub.close(linger=0)
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None
        if self.recorder is not None:
            self.recorder.close()

    def __repr__(self) -> str:
        return f"VLLMEventSubscriber({self.endpoint}, last_seq={self.last_seq})"
