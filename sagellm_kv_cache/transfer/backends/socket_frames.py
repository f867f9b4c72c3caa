"""Frames of ``SocketTransferBackend`` and the control store it serves.

Every message on a connection is a request answered by one response; both
start with a fixed, validated struct, and what follows is raw bytes (a
store key and value, or a tensor's bytes). Nothing is unpickled or
evaluated::

    request  : REQUEST_STRUCT  magic b"SKVQ" | version u8 | op u8 | key_len u16 |
                               src_rank u32 | arg u64 | value_len u64
               key (key_len bytes, ASCII) | value (value_len bytes)
    response : RESPONSE_STRUCT magic b"SKVR" | version u8 | status u8 | pad u16 |
                               value_len u64
               value (value_len bytes; for ERROR: code NUL message, UTF-8)

Ops: DATA (``arg`` = tag, value = the tensor's bytes), and the control store
of the engine's protocol (``engine.py``): SET, GET (``arg`` = wait in ms),
CHECK, CAS (``arg`` = length of the expected value, value = expected +
desired), DELETE, WAIT (``arg`` = wait in ms). The KV payload's checksum is
the engine's (``wire.py`` trailer), checked by the receiver before anything
becomes visible. The fixed parts are built and checked here only
(``encode_request``/``decode_request``, ``encode_response``/``decode_response``),
for the client (``socket.py``) and the server (``socket_server.py``) alike.

``LocalStore`` is the store itself: a thread-safe dict with the subset of
the c10d ``Store`` interface the engine uses, bounded in total bytes. It is
also usable on its own, in one process (``CommTransferBackendAdapter``).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from datetime import timedelta
from typing import Any

from ...errors import KVInvalidInputError, KVTransferFailedError, KVTransferTimeoutError

__all__ = [
    "FRAME_VERSION",
    "REQUEST_STRUCT",
    "RESPONSE_STRUCT",
    "LocalStore",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "recv_exact",
    "recv_into",
]

REQUEST_MAGIC = b"SKVQ"
RESPONSE_MAGIC = b"SKVR"
FRAME_VERSION = 1
REQUEST_STRUCT = struct.Struct("<4sBBHIQQ")
RESPONSE_STRUCT = struct.Struct("<4sBBHQ")

OP_DATA, OP_SET, OP_GET, OP_CHECK, OP_CAS, OP_DELETE, OP_WAIT = range(1, 8)
OP_NAMES = {
    OP_DATA: "DATA",
    OP_SET: "SET",
    OP_GET: "GET",
    OP_CHECK: "CHECK",
    OP_CAS: "CAS",
    OP_DELETE: "DELETE",
    OP_WAIT: "WAIT",
}
ST_OK, ST_MISSING, ST_ERROR = 0, 1, 2

MAX_KEY_BYTES = 512
#: an ERROR response's text is cut to this; a larger response value is refused
MAX_ERROR_BYTES = 4096
#: the longest wait a peer may ask of the store (ms)
MAX_WAIT_MS = 600_000


def protocol_error(msg: str, **details: Any) -> KVTransferFailedError:
    return KVTransferFailedError(f"bad socket frame: {msg}", **details)


def size_error(tag: int, peer: int, got: int, room: int) -> KVTransferFailedError:
    """A message whose size differs from the buffer posted for it."""
    return KVTransferFailedError(
        f"message {tag} from rank {peer} has {got} bytes, the buffer {room}", peer=peer
    )


def encode_request(op: int, key: bytes, src_rank: int, arg: int, value_len: int) -> bytes:
    """A request's fixed part and its key (the ``value_len`` bytes of value follow)."""
    head = REQUEST_STRUCT.pack(REQUEST_MAGIC, FRAME_VERSION, op, len(key), src_rank, arg, value_len)
    return head + key


def decode_request(raw: bytes) -> tuple[int, int, int, int, int]:
    """``(op, key_len, src_rank, arg, value_len)`` of a request's fixed part;
    a foreign magic or version, or an unknown op, is a ``protocol_error``."""
    magic, version, op, key_len, src_rank, arg, value_len = REQUEST_STRUCT.unpack(raw)
    if magic != REQUEST_MAGIC:
        raise protocol_error(f"magic {magic!r}, expected {REQUEST_MAGIC!r}", field="magic")
    if version != FRAME_VERSION:
        raise protocol_error(
            f"version {version}, this build speaks {FRAME_VERSION}", field="version"
        )
    if op not in OP_NAMES:
        raise protocol_error(f"unknown op {op}", field="op")
    return op, key_len, src_rank, arg, value_len


def encode_response(status: int, value: bytes) -> bytes:
    return RESPONSE_STRUCT.pack(RESPONSE_MAGIC, FRAME_VERSION, status, 0, len(value)) + value


def decode_response(raw: bytes, what: str, peer: int) -> tuple[int, int]:
    """``(status, value_len)`` of a response's fixed part (``what`` and ``peer``
    name it in a ``protocol_error``: foreign magic or version, unknown status)."""
    magic, version, status, _pad, value_len = RESPONSE_STRUCT.unpack(raw)
    if magic != RESPONSE_MAGIC or version != FRAME_VERSION:
        raise protocol_error(f"{what}: magic/version {magic!r}/{version}", peer=peer)
    if status not in (ST_OK, ST_MISSING, ST_ERROR):
        raise protocol_error(f"{what}: unknown status {status}", peer=peer)
    return status, value_len


def recv_into(sock: socket.socket, view: memoryview, what: str) -> None:
    """Fill ``view`` from ``sock``; a short read or a stall is a typed error."""
    got, n = 0, len(view)
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            raise KVTransferTimeoutError(
                f"{what}: got {got} of {n} bytes before the socket timed out"
            ) from None
        except OSError as exc:
            raise KVTransferFailedError(f"{what}: connection failed ({exc})") from None
        if k == 0:
            raise KVTransferFailedError(f"{what}: connection closed after {got} of {n} bytes")
        got += k


def recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    recv_into(sock, memoryview(buf), what)
    return bytes(buf)


def encode_error(code: str, message: str) -> bytes:
    return (code.encode("ascii", "replace") + b"\0" + message.encode("utf-8", "replace"))[
        :MAX_ERROR_BYTES
    ]


def decode_error(raw: bytes) -> tuple[str, str]:
    code, _, msg = bytes(raw).partition(b"\0")
    return code.decode("ascii", "replace")[:64], msg.decode("utf-8", "replace")


def _key(key: Any) -> str:
    if isinstance(key, bytes | bytearray):
        key = bytes(key).decode("ascii", "replace")
    if not isinstance(key, str) or not key or len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise KVInvalidInputError(f"store key must be a non-empty str of <= {MAX_KEY_BYTES} bytes")
    return key


def _value(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise KVInvalidInputError(f"store value must be bytes or str, got {type(value).__name__}")


def _seconds(timeout: Any) -> float:
    if isinstance(timeout, timedelta):
        return timeout.total_seconds()
    return float(timeout)


class LocalStore:
    """In-memory control store (``set/get/check/wait/compare_set/delete_key``).

    ``compare_set`` follows c10d: it sets ``desired`` when the key holds
    ``expected`` (or is absent and ``expected`` is empty) and returns the
    value the key holds afterwards. Waits are bounded (``timeout_s``, or the
    timeout given) and raise ``KVTransferTimeoutError`` ("timed out").

    Args:
        timeout_s: default bound of ``get`` and ``wait``.
        max_bytes: total bytes of keys and values held; a ``set`` beyond it
            raises ``KVTransferFailedError`` and stores nothing.
    """

    def __init__(self, timeout_s: float = 30.0, max_bytes: int = 256 << 20) -> None:
        self.timeout_s = float(timeout_s)
        self.max_bytes = int(max_bytes)
        self._data: dict[str, bytes] = {}
        self._nbytes = 0
        self._cond = threading.Condition()
        self._closed = False

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def num_keys(self) -> int:
        with self._cond:
            return len(self._data)

    def _put(self, key: str, value: bytes) -> None:
        old = self._data.get(key)
        grow = len(value) + len(key) - (len(old) + len(key) if old is not None else 0)
        if self._nbytes + grow > self.max_bytes:
            raise KVTransferFailedError(
                f"control store full: {self._nbytes} + {grow} bytes exceeds {self.max_bytes}"
            )
        self._data[key] = value
        self._nbytes += grow
        self._cond.notify_all()

    def set(self, key: Any, value: Any) -> None:
        key, value = _key(key), _value(value)
        with self._cond:
            self._put(key, value)

    def _wait_for(self, keys: list[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while not all(k in self._data for k in keys):
            left = deadline - time.monotonic()
            if left <= 0 or self._closed:
                return False
            self._cond.wait(left)
        return True

    def get(self, key: Any, timeout: Any = None) -> bytes:
        key = _key(key)
        t = self.timeout_s if timeout is None else _seconds(timeout)
        with self._cond:
            if not self._wait_for([key], t):
                raise KVTransferTimeoutError(f"store get({key!r}) timed out after {t:.3f} s")
            return self._data[key]

    def check(self, keys: Any) -> bool:
        keys = [_key(k) for k in ([keys] if isinstance(keys, str) else keys)]
        with self._cond:
            return all(k in self._data for k in keys)

    def wait(self, keys: Any, timeout: Any = None) -> None:
        keys = [_key(k) for k in ([keys] if isinstance(keys, str) else keys)]
        t = self.timeout_s if timeout is None else _seconds(timeout)
        with self._cond:
            if not self._wait_for(keys, t):
                raise KVTransferTimeoutError(f"store wait({keys}) timed out after {t:.3f} s")

    def compare_set(self, key: Any, expected: Any, desired: Any) -> bytes:
        key, expected, desired = _key(key), _value(expected), _value(desired)
        with self._cond:
            cur = self._data.get(key)
            if (cur is None and expected == b"") or cur == expected:
                self._put(key, desired)
                return desired
            return expected if cur is None else cur

    def delete_key(self, key: Any) -> bool:
        key = _key(key)
        with self._cond:
            old = self._data.pop(key, None)
            if old is None:
                return False
            self._nbytes -= len(old) + len(key)
            return True

    def close(self) -> None:
        """Wake every waiter (they time out at once)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
