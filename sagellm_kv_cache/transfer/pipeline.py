"""Direct-mode data plane: move a transfer's slab views one message each, a
bounded window in flight, and hash them in message order.

Messages go to the backend in groups of ``backend.batch_messages``
(``expose_many`` / ``fetch_many``): one call and one completion per group,
which a one-sided transport such as NIXL turns into one READ with many
descriptors. Both sides cut the same views into the same groups
(``group_sizes``: growing at the start, shrinking at the end), so the
sender's hashing runs beside the READ of the group before and the
receiver's beside the READ of the group after, and what is left to hash
once the last one lands is one message, not a whole group. A receiver whose
backend moves data inside the caller's own calls (NIXL over shared memory:
the READ runs inside ``fetch_many``) posts at most ``groups_in_flight`` groups
at once, so it hands each landed group to the hashers before the call that
moves the next; the sender exposes its whole window ahead, so the next
group's descriptors are there when the receiver asks.

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

__all__ = ["TAPER_MIN_BYTES", "group_sizes", "land", "move_direct"]

#: a group of more bytes than this at the end of a transfer is cut in halves
TAPER_MIN_BYTES = 4 << 20


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
    views = list(views)
    nbytes = [v.numel() * v.element_size() for v in views]  # no host copy of a CUDA view
    sizes = group_sizes(nbytes, getattr(backend, "batch_messages", 1))
    cap = (None if send else getattr(backend, "groups_in_flight", None)) or len(sizes) or 1
    groups: deque[tuple[int, Any, list[Any], list[Any]]] = deque()
    in_flight = 0  # messages
    sink: list[Exception] = errors if errors is not None else []

    def finish_one() -> None:
        nonlocal in_flight
        first, work, group, tokens = groups.popleft()
        in_flight -= len(group)
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
        nonlocal in_flight
        while groups and (in_flight + len(group) > window or len(groups) >= cap):
            finish_one()
        in_flight += len(group)
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
        first = 0
        for size in sizes:
            group = views[first : first + size]
            if send and check:
                for m, view in enumerate(group, first):
                    if source_digest is not None:
                        cs.add(source_digest(m, view))  # kept, or hashed now
                    else:
                        # hash first: the message is then hot in cache when the transport reads it
                        cs.update(bytes_of(view))
                    # a transport that moves only inside our calls (NIXL without its
                    # progress thread) sends the groups exposed so far meanwhile
                    backend.progress()
            post(first, group)
            first += size
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


def group_sizes(nbytes: list[int], batch: int, taper_bytes: int = TAPER_MIN_BYTES) -> list[int]:
    """How many messages go in each group, given each message's bytes.

    The unit is as many leading messages as ``taper_bytes`` holds (at least one).
    Groups grow from one unit by doubling at the start, so the sender that
    hashes before it exposes has its first group out soon, and shrink by
    halving to one unit at the end, so the receiver has little left to hash
    once the last one lands; in between, groups of ``batch``. 64 messages of
    16 MiB in groups of at most 64 are ``[1, 2, 4, 8, 17, 16, 8, 4, 2, 1, 1]``;
    small messages (64 of 64 bytes) make one group.
    """
    batch = max(1, int(batch))
    n = len(nbytes)
    unit, held = 0, 0
    while unit < n and (unit == 0 or held + nbytes[unit] <= taper_bytes):
        held += nbytes[unit]
        unit += 1
    unit = min(unit, batch)
    head: list[int] = []
    tail: list[int] = []  # from the end: unit, unit, then each the sum of those after it
    left = n
    while left:
        grow = min(2 * head[-1], batch) if head else unit
        shrink = min(sum(tail), batch) if len(tail) > 1 else unit
        side, want = (tail, shrink) if shrink <= grow else (head, grow)
        take = min(want, left)
        left -= take
        if take < want:  # the short last piece, in the middle: joins a neighbour
            if head and head[-1] + take <= batch:
                head[-1] += take
                continue
            if tail and tail[-1] + take <= batch:
                tail[-1] += take
                continue
        side.append(take)
    return head + tail[::-1]


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
