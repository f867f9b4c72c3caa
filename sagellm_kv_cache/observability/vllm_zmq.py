"""vLLM-compatible KV events over ZMQ: the publisher (the subscriber is in
``vllm_subscriber``).

Frames and payloads are vLLM's (see ``vllm_wire`` for the exact layout,
following ``vllm/distributed/kv_events.py``'s ``ZmqEventPublisher``)::

    publisher  XPUB (a PUB to subscribers)  [topic, seq (8 B big-endian), payload]
               ROUTER replay                [id, b"", start_seq] -> [id, b"", seq, payload]...
                                            then [id, b"", -1, b""]
    subscriber SUB  + DEALER (replay requests: [b"", start_seq])

``VLLMEventPublisher`` always binds, to loopback unless the user names
another address (``tcp://127.0.0.1:*`` picks a free port; read the bound one
from ``.endpoint``). A replay thread serves the ROUTER from a buffer of the
last ``buffer_steps`` batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from .._closing import Closing
from ..errors import KVConfigError, KVInvalidInputError
from .vllm_wire import END_SEQ, encode_batch, pack_seq, unpack_seq

__all__ = ["VLLMEventPublisher", "check_endpoint"]

log = logging.getLogger(__name__)


def check_endpoint(endpoint: Any, what: str) -> str:
    """``endpoint`` if it reads as a ZMQ endpoint (``scheme://address``), else a
    ``KVConfigError`` naming ``what`` (callers check before they create anything)."""
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise KVConfigError(f"{what} must be a ZMQ endpoint like tcp://127.0.0.1:5557")
    return endpoint


class VLLMEventPublisher(Closing):
    """Publish KV event batches in vLLM's wire format, with a replay buffer.

    Args:
        endpoint: where the PUB side binds (default loopback, a free port).
        replay_endpoint: where the ROUTER replay side binds; None: no replay.
        topic: topic frame of every message (vLLM's ``topic``, default "").
        data_parallel_rank: stamped on batches that carry none.
        buffer_steps: batches kept for replay (vLLM's default 10,000).
        sndhwm: ZMQ send high-water mark per subscriber.
        encoding: "array" (vLLM <= 0.23) or "map" (events as tagged maps).
        context: a ``zmq.Context`` (default the process-wide instance).
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:*",
        replay_endpoint: str | None = None,
        *,
        topic: str = "",
        data_parallel_rank: int = 0,
        buffer_steps: int = 10_000,
        sndhwm: int = 100_000,
        encoding: str = "array",
        context: Any = None,
    ) -> None:
        check_endpoint(endpoint, "endpoint")
        if replay_endpoint is not None:
            check_endpoint(replay_endpoint, "replay_endpoint")
        if encoding not in ("array", "map"):
            raise KVConfigError(f"encoding must be 'array' or 'map', got {encoding!r}")
        if isinstance(buffer_steps, bool) or not isinstance(buffer_steps, int) or buffer_steps < 1:
            raise KVConfigError(f"buffer_steps must be a positive int, got {buffer_steps!r}")
        self.topic = topic.encode("utf-8")
        self.data_parallel_rank = data_parallel_rank
        self.encoding = encoding
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        self.num_subscriptions = 0
        self._closed = threading.Event()
        self._on_close: list[Callable[[], Any]] = []
        # XPUB: a PUB to subscribers that also tells us when one subscribed
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.SNDHWM, sndhwm)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # count every subscriber's subscribe
        self._pub.setsockopt(zmq.LINGER, 0)
        self._router = None
        self._thread = None
        try:
            self._pub.bind(endpoint)
            self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self.replay_endpoint = None
            if replay_endpoint is not None:
                self._router = self._ctx.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                # a ROUTER drops what exceeds the HWM: let one whole buffer through
                self._router.setsockopt(zmq.SNDHWM, buffer_steps + 2)
                self._router.bind(replay_endpoint)
                self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise KVConfigError(f"cannot bind KV event publisher: {exc}") from None
        if self._router is not None:
            self._thread = threading.Thread(
                target=self._serve_replay, name="kv-event-replay", daemon=True
            )
            self._thread.start()

    # -- publishing ----------------------------------------------------------
    def publish(
        self, events: Iterable[Any], ts: float | None = None, data_parallel_rank: int | None = None
    ) -> int:
        """Publish one batch of ``vllm_wire`` events; returns its sequence number."""
        rank = self.data_parallel_rank if data_parallel_rank is None else data_parallel_rank
        payload = encode_batch(
            time.time() if ts is None else ts, events, rank, encoding=self.encoding
        )
        return self.publish_payload(payload)

    def publish_payload(self, payload: bytes) -> int:
        """Publish an already encoded batch (e.g. replaying a recording)."""
        with self._lock:
            if self._closed.is_set():
                raise KVInvalidInputError("the publisher is closed")
            seq = self._next_seq
            self._next_seq = seq + 1
            self._drain_subscriptions()
            # PUB semantics: never blocks; a subscriber past its HWM misses the batch
            self._pub.send_multipart((self.topic, pack_seq(seq), payload), copy=False)
            self._buffer.append((seq, payload))
        return seq

    def _drain_subscriptions(self) -> None:
        while self._pub.poll(0, zmq.POLLIN):
            msg = self._pub.recv()
            if msg[:1] == b"\x01":
                self.num_subscriptions += 1

    def wait_for_subscribers(self, n: int = 1, timeout_s: float = 5.0) -> bool:
        """Block until ``n`` subscriptions arrived (ZMQ's slow joiner); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                self._drain_subscriptions()
                if self.num_subscriptions >= n:
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # poll outside the lock would race publish(); a short bounded wait instead
            with self._lock:
                self._pub.poll(min(remaining, 0.05) * 1000, zmq.POLLIN)

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest batch (-1: none yet)."""
        return self._next_seq - 1

    # -- replay ----------------------------------------------------------------
    def _serve_replay(self) -> None:
        router = self._router
        assert router is not None, "the replay thread runs only with a ROUTER socket"
        while not self._closed.is_set():
            try:
                if not router.poll(100, zmq.POLLIN):
                    continue
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                if self._closed.is_set():
                    return
                continue
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                log.warning("invalid KV event replay request of %d frames", len(frames))
                continue
            client, start = frames[0], unpack_seq(frames[2])
            with self._lock:
                todo = [(s, p) for s, p in self._buffer if s >= start]
            try:
                for seq, payload in todo:
                    router.send_multipart((client, b"", pack_seq(seq), payload), copy=False)
                router.send_multipart((client, b"", END_SEQ, b""))
            except zmq.ZMQError:  # the client went away
                continue

    # -- lifetime ----------------------------------------------------------------
    def _close_sockets(self) -> None:
        self._pub.close(linger=0)
        if self._router is not None:
            self._router.close(linger=0)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the replay thread (joined with a timeout) and close both sockets."""
        if self._closed.is_set():
            return
        for callback in self._on_close:  # e.g. unsubscribe from a KVEventStream
            callback()
        with self._lock:
            self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._close_sockets()

    def __repr__(self) -> str:
        return f"VLLMEventPublisher({self.endpoint}, replay={self.replay_endpoint}, last_seq={self.last_seq})"
