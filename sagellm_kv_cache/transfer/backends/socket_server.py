"""The serving side of ``SocketTransferBackend`` (a mixin): accept, read and
check each frame, answer it.

One thread per connection (at most ``max_connections``). A frame is read
header first; its lengths are checked against the limits before a byte of
its body is read, and DATA bytes go straight into a posted fetch's buffer
or into inbox room reserved beforehand, so no peer can make this side hold
more than the declared limits. A bad frame is answered with a typed error
(code NUL message), recorded in ``protocol_errors``, and its connection
closed. ``RemoteStore`` is the client's view of the store served here.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from typing import Any

from ...errors import KVCacheError, KVTransferFailedError, KVTransferTimeoutError
from .socket_frames import (
    MAX_KEY_BYTES,
    MAX_WAIT_MS,
    OP_CAS,
    OP_CHECK,
    OP_DATA,
    OP_DELETE,
    OP_GET,
    OP_NAMES,
    OP_SET,
    OP_WAIT,
    REQUEST_STRUCT,
    ST_ERROR,
    ST_MISSING,
    ST_OK,
    LocalStore,
    decode_request,
    encode_error,
    encode_response,
    protocol_error,
    recv_exact,
    recv_into,
    size_error,
)

__all__ = ["RemoteStore", "SocketServerMixin"]


class RemoteStore:
    """The control store of rank ``store_rank``, reached over the socket."""

    def __init__(self, backend: Any) -> None:
        self._b = backend

    def _call(self, op: int, key: Any, arg: int = 0, value: bytes = b"", wait_s: float = 0.0):
        key = key.decode("ascii") if isinstance(key, bytes) else key
        b = self._b
        return b._rpc(b.store_rank, op, key, arg, value, wait_s, b.max_store_bytes)

    def set(self, key: Any, value: Any) -> None:
        self._call(OP_SET, key, 0, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key: Any) -> bytes:
        t = self._b.recv_timeout_s
        return self._call(OP_GET, key, int(t * 1000), b"", t)[1]

    def check(self, keys: Any) -> bool:
        keys = [keys] if isinstance(keys, str) else keys
        return all(self._call(OP_CHECK, k)[0] == ST_OK for k in keys)

    def wait(self, keys: Any, timeout: Any = None) -> None:
        t = self._b.recv_timeout_s if timeout is None else getattr(timeout, "total_seconds", None)
        t = t() if callable(t) else float(timeout if t is None else t)
        deadline = time.monotonic() + t
        for k in [keys] if isinstance(keys, str) else keys:
            left = max(deadline - time.monotonic(), 0.0)
            self._call(OP_WAIT, k, min(int(left * 1000), MAX_WAIT_MS), b"", left)

    def compare_set(self, key: Any, expected: Any, desired: Any) -> bytes:
        e = expected.encode() if isinstance(expected, str) else bytes(expected)
        d = desired.encode() if isinstance(desired, str) else bytes(desired)
        return self._call(OP_CAS, key, len(e), e + d)[1]

    def delete_key(self, key: Any) -> bool:
        return self._call(OP_DELETE, key)[0] == ST_OK


class SocketServerMixin:
    """Server half of ``SocketTransferBackend`` (reads its limits, inbox and slots,
    which ``SocketTransferBackend.__init__`` sets; declared here for the type checker)."""

    rank: int
    world_size: int
    recv_timeout_s: float
    idle_timeout_s: float
    max_message_bytes: int
    max_inbox_bytes: int
    max_store_bytes: int
    max_connections: int
    protocol_errors: deque[KVCacheError]
    _local_store: LocalStore | None
    _cond: threading.Condition
    _posted: dict[tuple[int, int], Any]
    _inbox: dict[tuple[int, int], bytearray]
    _inbox_bytes: int
    _conns: set[socket.socket]
    _threads: list[threading.Thread]
    _listener: socket.socket | None
    _running: bool
    _closed: bool

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None, "start() opens the listener before the accept thread"
        while self._running:
            try:
                conn, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                if self._closed or len(self._conns) >= self.max_connections:
                    self.protocol_errors.append(
                        KVTransferFailedError(f"refused a connection: {self.max_connections} open")
                    )
                    conn.close()
                    continue
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while self._running:
                conn.settimeout(self.idle_timeout_s)
                try:
                    first = conn.recv(1)
                except OSError:  # idle timeout, or closed under us
                    return
                if not first:
                    return
                try:
                    conn.settimeout(self.recv_timeout_s)
                    rest = recv_exact(conn, REQUEST_STRUCT.size - 1, "request header")
                    status, body = self._handle(conn, first + rest)
                except KVCacheError as exc:
                    self.protocol_errors.append(exc)
                    self._respond(conn, ST_ERROR, encode_error(exc.code, exc.message))
                    return
                if not self._respond(conn, status, body):
                    return
        finally:
            with self._cond:
                self._conns.discard(conn)
            conn.close()

    def _respond(self, conn: socket.socket, status: int, body: bytes) -> bool:
        try:
            conn.sendall(encode_response(status, body))
            return True
        except OSError:
            return False

    def _handle(self, conn: socket.socket, raw: bytes) -> tuple[int, bytes]:
        op, key_len, src, arg, n = decode_request(raw)
        if not 0 <= src < self.world_size or src == self.rank:
            raise protocol_error(f"src_rank {src} is not a peer", field="src_rank")
        if key_len > MAX_KEY_BYTES or (op == OP_DATA) != (key_len == 0):
            raise protocol_error(f"key of {key_len} bytes for {OP_NAMES[op]}", field="key_len")
        limit = self.max_message_bytes if op == OP_DATA else self.max_store_bytes
        if n > limit:
            raise protocol_error(f"{OP_NAMES[op]} of {n} bytes exceeds {limit}", field="value_len")
        if op == OP_DATA:
            self._on_data(conn, src, arg, n)
            return ST_OK, b""
        key = recv_exact(conn, key_len, "store key").decode("ascii", "replace")
        store = self._local_store
        if store is None:
            raise protocol_error(f"rank {self.rank} serves no store", field="op")
        value = recv_exact(conn, n, "store value")
        wait_s = min(arg, MAX_WAIT_MS) / 1000.0
        if op == OP_SET:
            store.set(key, value)
        elif op == OP_GET:
            return ST_OK, store.get(key, wait_s)
        elif op == OP_CHECK:
            return (ST_OK if store.check([key]) else ST_MISSING), b""
        elif op == OP_CAS:
            if arg > n:
                raise protocol_error(f"CAS expects {arg} of {n} bytes", field="arg")
            return ST_OK, store.compare_set(key, value[:arg], value[arg:])
        elif op == OP_DELETE:
            return (ST_OK if store.delete_key(key) else ST_MISSING), b""
        elif op == OP_WAIT:
            store.wait([key], wait_s)
        return ST_OK, b""

    def _on_data(self, conn: socket.socket, src: int, tag: int, n: int) -> None:
        key = (src, tag)
        deadline = time.monotonic() + self.recv_timeout_s
        with self._cond:
            while True:
                if key in self._inbox:
                    raise protocol_error(
                        f"message {tag} from rank {src} arrived twice", field="tag"
                    )
                slot = self._posted.get(key)
                if slot is not None:
                    del self._posted[key]
                    if len(slot.view) != n:
                        slot.state = 3
                        slot.error = size_error(tag, src, n, len(slot.view))
                        self._cond.notify_all()
                        raise slot.error
                    slot.state = 1
                    break
                if self._inbox_bytes + n <= self.max_inbox_bytes:
                    self._inbox_bytes += n  # reserved before a byte is read
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise KVTransferTimeoutError(
                        f"no room for a message of {n} bytes from rank {src}: inbox holds "
                        f"{self._inbox_bytes} of {self.max_inbox_bytes} and no fetch is posted"
                    )
                self._cond.wait(left)
        if slot is not None:
            try:
                recv_into(conn, slot.view, f"message {tag} from rank {src}")
            except KVCacheError as exc:
                with self._cond:
                    slot.state, slot.error = 3, exc
                    self._cond.notify_all()
                raise
            with self._cond:
                slot.state = 2
                self._cond.notify_all()
            return
        buf = bytearray(n)
        try:
            recv_into(conn, memoryview(buf), f"message {tag} from rank {src}")
        except KVCacheError:
            with self._cond:
                self._inbox_bytes -= n
                self._cond.notify_all()
            raise
        with self._cond:
            if self._closed:
                return
            # a fetch posted while the bytes were read (it found neither a slot
            # nor an inbox entry) gets them now: left in the inbox, nobody
            # would look for them again and the receiver would wait it out
            slot = self._posted.pop(key, None)
            if slot is None:
                self._inbox[key] = buf
                self._cond.notify_all()
                return
            self._inbox_bytes -= n
            if len(slot.view) == n:
                slot.view[:] = buf
                slot.state = 2
            else:
                slot.state = 3
                slot.error = size_error(tag, src, n, len(slot.view))
            self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
