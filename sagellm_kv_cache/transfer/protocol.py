"""The control plane of a distributed transfer: keys in the backend's store
and the per-peer sequence numbers in them, status values, the bounded waits
on them, and the rules every path shares (one retry loop, one checksum
comparison).

Keys of transfer ``seq`` from ``src`` to ``dst`` (``Keys``)::

    skvx/<dst>/<src>/<seq>/hdr     header (sender -> receiver)
                          /ready   OK[+direct plan] | <error code>:<message> | CANCELLED
                          /trl     trailer: checksum of the payload (sender -> receiver)
                          /ack     OK | <error code>:<message> | CANCELLED

The verdict keys (ready, ack) are written with ``compare_set`` against an
empty value: whichever side writes first wins, so a side that gave up
(CANCELLED) and one that finished cannot both believe they won.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

from ..errors import (
    KVBudgetExceededError,
    KVCacheError,
    KVChecksumMismatchError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from .wire import TransferHeader

__all__ = [
    "CANCELLED",
    "MODE_DIRECT",
    "MODE_STAGED",
    "OK",
    "Keys",
    "PeerSequences",
    "check_time",
    "encode_ready",
    "encode_status",
    "mismatch",
    "parse_ready",
    "remote_error",
    "settle",
    "store_wait",
    "tag",
    "tell",
    "with_retries",
]

OK = b"OK"
CANCELLED = b"CANCELLED"
KEY_ROOT = "skvx"
MODE_STAGED, MODE_DIRECT = 0, 1
_READY_DIRECT = struct.Struct("<BI")  # mode, blocks per message

T = TypeVar("T")


class Keys:
    """Control-plane keys of one transfer from ``src`` to ``dst``."""

    __slots__ = ("ack", "hdr", "ready", "trl")

    def __init__(self, src: int, dst: int, seq: int) -> None:
        base = f"{KEY_ROOT}/{dst}/{src}/{seq}"
        self.hdr = f"{base}/hdr"
        self.ready = f"{base}/ready"
        self.trl = f"{base}/trl"
        self.ack = f"{base}/ack"


class PeerSequences:
    """Sequence numbers of one side's exchanges with each peer, thread-safe.

    Both ends of a pair count their exchanges from 0, so the n-th one has
    the same store keys on either side (``Keys(src, dst, n)``): the posting
    side ``take``s the next number, the other side takes the posted value
    with ``take_posted`` and only then moves to the next number.
    """

    __slots__ = ("_lock", "_next")

    def __init__(self) -> None:
        self._next: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self, peer: int) -> int:
        """The next number of ``peer`` (it is used from now on)."""
        with self._lock:
            seq = self._next.get(peer, 0)
            self._next[peer] = seq + 1
            return seq

    def take_posted(
        self, store: Any, peers: Iterable[int], key_of: Callable[[int, int], str]
    ) -> tuple[int, int, bytes] | None:
        """``(peer, seq, value)`` of the first of ``peers`` whose next value is
        in ``store`` under ``key_of(peer, seq)``; the key is deleted and that
        peer's number advanced. None when none of them has posted yet."""
        with self._lock:
            for peer in peers:
                seq = self._next.get(peer, 0)
                key = key_of(peer, seq)
                if store.check([key]):
                    value = store.get(key)
                    store.delete_key(key)
                    self._next[peer] = seq + 1
                    return peer, seq, bytes(value)
        return None

    def wait_posted(
        self,
        store: Any,
        peers: Iterable[int],
        key_of: Callable[[int, int], str],
        deadline: float,
        stop: threading.Event | None = None,
    ) -> tuple[int, int, bytes] | None:
        """``take_posted``, polled (pauses from 0.2 ms doubling to 5 ms) until a
        value is taken; None once ``deadline`` (``time.monotonic``) has passed or
        ``stop`` is set."""
        peers = list(peers)
        pause = 0.0002
        while stop is None or not stop.is_set():
            taken = self.take_posted(store, peers, key_of)
            if taken is not None:
                return taken
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        return None


def tag(seq: int, chunk: int) -> int:
    """Message tag: unique per (pair, transfer, message) while fewer than 32768
    transfers of one pair are in flight; gloo tags are int32."""
    return ((seq & 0x7FFF) << 16) | (chunk & 0xFFFF)


def check_time(deadline: float, what: str) -> float:
    """Seconds left before ``deadline``; a typed timeout when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise KVTransferTimeoutError(f"{what}: timed out")
    return left


def encode_status(code: str, message: str = "") -> bytes:
    return f"{code}:{message[:500]}".encode()


def remote_error(raw: bytes, what: str, transfer_id: int, dst: int) -> KVTransferFailedError:
    """The typed error of a verdict the receiver wrote (``details["remote_code"]``)."""
    code, _, msg = bytes(raw).decode("utf-8", "replace").partition(":")
    if code == "CANCELLED":
        return KVTransferFailedError(f"{what}: the receiver cancelled", remote_code=code)
    cls: type[KVTransferFailedError] = KVTransferFailedError
    if code == KVChecksumMismatchError.code:
        cls = KVChecksumMismatchError
    elif code == KVTransferTimeoutError.code:
        cls = KVTransferTimeoutError
    return cls(f"{what} (transfer {transfer_id} to rank {dst}): [{code}] {msg}", remote_code=code)


def encode_ready(block_ids: list[int], per_message: int) -> bytes:
    """The receiver's OK for a direct-mode transfer: its plan and block ids."""
    return (
        OK
        + _READY_DIRECT.pack(MODE_DIRECT, per_message)
        + struct.pack(f"<{len(block_ids)}I", *block_ids)
    )


def parse_ready(ready: bytes, header: TransferHeader) -> tuple[int, int, list[int]]:
    """(mode, blocks per message, receiver block ids) of a ready message."""
    body = ready[len(OK) :]
    if not body:
        return MODE_STAGED, 0, []
    n = _READY_DIRECT.size
    if len(body) != n + 4 * header.num_blocks:
        raise KVTransferFailedError(f"malformed ready message of {len(ready)} bytes")
    mode, per_message = _READY_DIRECT.unpack_from(body)
    if mode != MODE_DIRECT or per_message <= 0:
        raise KVTransferFailedError(f"malformed ready message (mode {mode}, {per_message})")
    return mode, per_message, list(struct.unpack(f"<{header.num_blocks}I", body[n:]))


def store_wait(store: Any, key: str, timeout_s: float, what: str) -> bytes | None:
    """The value of ``key`` once set, or None when ``timeout_s`` passes first
    (a store that fails otherwise raises ``KVTransferFailedError``)."""
    if timeout_s <= 0:
        return bytes(store.get(key)) if store.check([key]) else None
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except Exception as exc:  # DistStoreError on timeout; others: store gone
        text = str(exc).lower()
        if "timeout" not in text and "timed out" not in text:
            raise KVTransferFailedError(f"{what}: control store failed: {exc}") from None
        return None
    return bytes(store.get(key))


def settle(store: Any, key: str, deadline: float, what: str) -> bytes:
    """Wait for the peer's verdict under ``key``; at the deadline, claim it as
    CANCELLED atomically. Returns whichever value won."""
    value = store_wait(store, key, deadline - time.monotonic(), what)
    if value is None:
        value = store.compare_set(key, b"", CANCELLED)
    return bytes(value)


def tell(store: Any, key: str, exc: BaseException) -> None:
    """Write this side's error as the verdict under ``key``, unless the sender
    already gave up there (then its CANCELLED mark is removed: nobody reads it)."""
    if isinstance(exc, KVCacheError):
        code, msg = exc.code, exc.message
    else:  # a bug here still reaches the sender typed, as a failed transfer
        code, msg = KVTransferFailedError.code, f"{type(exc).__name__}: {exc}"
    status = encode_status(code, msg)
    try:
        if store.compare_set(key, b"", status) != status:
            store.delete_key(key)
    except Exception:  # the store is gone: the sender times out instead
        pass


def mismatch(transfer_id: int, got: int, expected: int) -> KVChecksumMismatchError | None:
    """The error when the receiver's checksum ``got`` differs from the sender's."""
    if got == expected:
        return None
    return KVChecksumMismatchError(
        f"transfer {transfer_id}: received bytes hash to {got:#x}, "
        f"the sender's checksum is {expected:#x}"
    )


def _retryable(exc: BaseException) -> bool:
    """A checksum mismatch (bytes damaged on the way) or a receiver without room."""
    if isinstance(exc, KVChecksumMismatchError):
        return True
    code = exc.details.get("remote_code") if isinstance(exc, KVCacheError) else None
    return code in (KVBudgetExceededError.code, "KV_POOL_FULL")


def with_retries(max_retries: int, backoff_ms: float, attempt: Callable[[int], T]) -> T:
    """``attempt(n)`` for n = 0, 1, ... until it returns; a retryable failure
    (see ``_retryable``) is tried again after ``backoff_ms * 2**n``, at most
    ``max_retries`` times. Timeouts and dead peers are not retried (gloo
    closes the link after one)."""
    n = 0
    while True:
        try:
            return attempt(n)
        except KVCacheError as exc:
            if n >= max_retries or not _retryable(exc):
                raise
        time.sleep(backoff_ms * (2**n) / 1000.0)
        n += 1
