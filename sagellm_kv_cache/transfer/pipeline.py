"""Direct-mode data plane: move a transfer's slab views one message each, a
bounded window in flight, and hash them in message order.

Messages go to the backend in groups of ``backend.batch_messages``
(``expose_many`` / ``fetch_many``): one call and one completion per group,
which a one-sided transport such as NIXL turns into one READ with many
descriptors. Both sides cut the same views into the same groups.

The receiver checks each message's length (``TailGuard``) and hashes it
once its group has landed; a failure there (a short message, a fault on
this side) is collected in ``errors`` and the stream goes on, so the sender
finishes and reads the typed verdict from the ack. Transport failures
(``KVCacheError`` from a wait: timeouts, dead peers) end the transfer at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import KVCacheError, KVTransferTimeoutError
from .backends.base import TransferBackend
from .guard import TailGuard
from .plan import bytes_of
from .protocol import check_time, tag
from .wire import Checksum, TransferHeader, digest

__all__ = ["land", "move_direct"]


def land(work: Any, deadline: float, what: str, errors: list[Exception]) -> bool:
    """Wait for a receive to land. Transport errors raise; anything else (a
    fault after the bytes landed) goes to ``errors``; returns whether it landed
    cleanly."""
    try:
        work.wait(check_time(deadline, what))
    except KVCacheError:
        raise
    except Exception as exc:
        errors.append(exc)
        return False
    return True


def move_direct(
    backend: TransferBackend,
    header: TransferHeader,
    views: Iterable[Any],
    peer: int,
    seq: int,
    deadline: float,
    window: int,
    *,
    send: bool,
    errors: list[Exception] | None = None,
    guard: TailGuard | None = None,
    source_digest: Callable[[int, Any], int] | None = None,
) -> int:
    """Send (``send``) or receive ``views``, at most ``window`` messages in
    flight; returns the checksum of the messages in order. A sender may pass
    ``source_digest(m, view)`` for the digest of message ``m`` (kept digests
    of cached source pieces, ``digests.SourcePieces``)."""
    cs = Checksum(header.checksum_algo)
    check = header.checksum_algo != "none"
    batch = max(1, int(getattr(backend, "batch_messages", 1)))
    groups: deque[tuple[int, Any, list[Any], list[Any]]] = deque()
    sink: list[Exception] = errors if errors is not None else []

    def finish_one() -> None:
        first, work, group, tokens = groups.popleft()
        what = f"messages {first}..{first + len(group) - 1}"
        if send:
            work.wait(check_time(deadline, what))
            return
        if not land(work, deadline, what, sink):
            return
        for i, (view, token) in enumerate(zip(group, tokens)):
            try:
                if guard is not None:
                    guard.check(token, f"message {first + i}")
                if hasher is not None:
                    hasher.put(view)
            except Exception as exc:
                sink.append(exc)

    def post(first: int, group: list[Any]) -> None:
        tags = [tag(seq, first + i) for i in range(len(group))]
        if send:
            groups.append((first, backend.expose_many(peer, tags, group), group, []))
        else:
            tokens = [guard.arm(v) if guard is not None else None for v in group]
            groups.append((first, backend.fetch_many(peer, tags, group), group, tokens))

    # the receiver hashes on threads of its own (xxhash releases the GIL), so a
    # transport that moves data only inside this thread's calls (NIXL's READ
    # over shared memory) keeps moving while the landed messages are hashed
    hasher = _Hasher(header.checksum_algo) if check and not send else None
    try:
        pending: list[Any] = []
        first = 0
        for m, view in enumerate(views):
            if send and check:
                if source_digest is not None:
                    cs.add(source_digest(m, view))
                else:
                    # hash first: the message is then hot in cache when the transport reads it
                    cs.update(bytes_of(view))
                    backend.progress()
            pending.append(view)
            if len(pending) == batch:
                while len(groups) * batch >= window:
                    finish_one()
                post(first, pending)
                first, pending = m + 1, []
        if pending:
            while len(groups) * batch >= window:
                finish_one()
            post(first, pending)
        while groups:
            finish_one()
    except BaseException:
        if hasher is not None:
            hasher.stop()
        raise
    if hasher is not None:
        for d in hasher.finish(deadline, sink):
            cs.add(d)
    return cs.value()


class _Hasher:
    """Digests of the messages handed to ``put``, in order, on ``workers``
    threads. A one-sided transport hands over a whole group at once when its
    READ is done and is idle while it is hashed, so two threads halve that tail."""

    def __init__(self, algo: str, workers: int = 2) -> None:
        self.algo = algo
        self.error: BaseException | None = None
        self._digests: dict[int, int] = {}
        self._count = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name="kvx-hash", daemon=True) for _ in range(workers)
        ]
        for t in self._threads:
            t.start()

    def put(self, view: Any) -> None:
        self._queue.put((self._count, view))
        self._count += 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                # dict stores of distinct keys are atomic under the GIL
                self._digests[item[0]] = digest(self.algo, bytes_of(item[1]))
            except BaseException as exc:  # reported by finish()
                self.error = exc

    def stop(self) -> None:
        """Let the workers end after what they hold (the transfer failed)."""
        for _ in self._threads:
            self._queue.put(None)

    def finish(self, deadline: float, errors: list[Exception]) -> list[int]:
        """The digests in message order, once every message put was hashed (a
        hashing failure goes to ``errors``, like the receiver's other
        per-message failures)."""
        self.stop()
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.001))
            if t.is_alive():
                raise KVTransferTimeoutError("hashing the received messages: timed out")
        if isinstance(self.error, Exception):
            errors.append(self.error)
            return []
        if self.error is not None:
            raise self.error
        return [self._digests[i] for i in range(self._count)]
