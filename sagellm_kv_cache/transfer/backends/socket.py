"""``SocketTransferBackend`` (seed API): KV transfer over plain TCP sockets.

::

    rank s (sender)                                  rank d (receiver)
    engine.transfer_kv_handle  --- DATA(tag) ---->   server thread: into the buffer
      expose(d, tag, chunk)        (raw bytes)       a posted fetch(s, tag, out) named,
                               <--- OK / ERROR ---   else into a bounded inbox
    store ops (hdr/ready/trl/ack) --- SET/CAS... -->  rank ``store_rank`` serves the store

Each rank listens on its endpoint (``127.0.0.1`` unless the caller names
another address) and opens connections to its peers on demand. Frames are
``socket_frames.py``: a fixed struct header checked field by field, then raw
bytes; nothing read from a socket is unpickled or evaluated. The payload's
integrity is the engine's (header and checksum trailer of ``wire.py``).

Limits that hold whatever a peer sends: a message larger than
``max_message_bytes`` is refused before a byte of it is read; data that
arrives before its fetch is posted waits in an inbox of at most
``max_inbox_bytes`` (the sender is held back, bounded by ``recv_timeout_s``,
until there is room); the store holds at most ``max_store_bytes``; at most
``max_connections`` peers are served at once. A bad frame (wrong magic or
version, unknown op, oversize length, short read) is answered with a typed
error where possible, recorded in ``protocol_errors``, and its connection
is closed; the backend goes on serving.

Seed methods: ``start``, ``close``, ``send(tensor, dst_rank)``,
``recv(tensor, src_rank)``, ``get_rank``, ``get_world_size``. ``send`` takes
a tensor or a bytes-like object and returns once the receiver holds the
bytes; ``recv`` fills a tensor of the same byte size (or a ``bytearray``,
resized) within ``recv_timeout_s``. Unlike the seed, nothing is pickled:
only raw bytes travel. Anyone who can reach the port can talk to it, so
bind a non-loopback address only on a trusted network.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections import deque
from typing import Any

from ...errors import (
    KVCacheError,
    KVConfigError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from .base import TransferBackend
from .socket_frames import (
    MAX_ERROR_BYTES,
    OP_DATA,
    OP_NAMES,
    RESPONSE_STRUCT,
    ST_ERROR,
    LocalStore,
    decode_error,
    decode_response,
    encode_request,
    protocol_error,
    recv_exact,
    size_error,
)
from .socket_server import RemoteStore, SocketServerMixin

__all__ = ["SocketTransferBackend"]

#: tags of the seed's ``send``/``recv`` (the engine's tags stay below 2**31)
SEED_TAG_BASE = 1 << 62
_MAX_IDLE_PER_PEER = 8


def _int_arg(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise KVInvalidTypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise KVInvalidInputError(f"{name}={v} out of range [{lo}, {hi}]")
    return int(v)


def _endpoint(rank: int, ep: Any) -> tuple[str, int]:
    if not (isinstance(ep, tuple | list) and len(ep) == 2 and isinstance(ep[0], str) and ep[0]):
        raise KVConfigError(f"endpoint of rank {rank} must be (host, port), got {ep!r}")
    return ep[0], _int_arg(f"port of rank {rank}", ep[1], 0, 65535)


def _in_view(data: Any) -> memoryview:
    """Raw bytes of what ``send``/``expose`` were given (tensor or bytes-like)."""
    import torch

    if isinstance(data, torch.Tensor):
        t = data.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        return memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only on Python >= 3.12
    try:
        return memoryview(data).cast("B")
    except TypeError:
        raise KVInvalidTypeError(
            f"can send a tensor or a bytes-like object, not {type(data).__name__}"
        ) from None


def _out_view(out: Any) -> tuple[memoryview, Any]:
    """A writable byte view for ``out`` and a bounce tensor to copy back (or None)."""
    import torch

    if isinstance(out, torch.Tensor):
        if out.device.type == "cpu" and out.is_contiguous():
            flat = out.reshape(-1).view(torch.uint8).numpy()
            return memoryview(flat), None  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only on Python >= 3.12
        bounce = torch.empty(out.numel() * out.element_size(), dtype=torch.uint8)
        return memoryview(bounce.numpy()), bounce  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only on Python >= 3.12
    try:
        mv = memoryview(out)
    except TypeError:
        raise KVInvalidTypeError(
            f"can receive into a tensor or a writable buffer, not {type(out).__name__}"
        ) from None
    if mv.readonly:
        raise KVInvalidTypeError("the receive buffer is read-only")
    return mv.cast("B"), None


def _copy_back(out: Any, bounce: Any) -> None:
    if bounce is not None:
        out.copy_(bounce.view(out.dtype).view(out.shape))


class _Slot:
    """A posted fetch: the server writes straight into ``view``."""

    __slots__ = ("error", "state", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.state = 0  # 0 posted, 1 being written, 2 done, 3 failed
        self.error: BaseException | None = None


class _Done:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    def wait(self, timeout_s: float) -> None:
        if self.error is not None:
            raise self.error


class _FetchWork:
    __slots__ = ("backend", "bounce", "key", "out", "slot")

    def __init__(self, backend, key, slot, out, bounce) -> None:
        self.backend, self.key, self.slot, self.out, self.bounce = backend, key, slot, out, bounce

    def wait(self, timeout_s: float) -> None:
        b, slot = self.backend, self.slot
        deadline = time.monotonic() + max(float(timeout_s), 0.001)
        with b._cond:
            while slot.state < 2:
                left = deadline - time.monotonic()
                if left <= 0 or b._closed:
                    if slot.state == 0:  # not begun: withdraw it
                        b._posted.pop(self.key, None)
                        slot.state = 3
                    what = "the backend was closed" if b._closed else f"{timeout_s:.3f} s passed"
                    raise KVTransferTimeoutError(
                        f"message {self.key[1]} from rank {self.key[0]} did not arrive: {what}",
                        peer=self.key[0],
                    )
                b._cond.wait(left)
        if slot.error is not None:
            raise slot.error
        _copy_back(self.out, self.bounce)


class SocketTransferBackend(SocketServerMixin, TransferBackend):
    """A ``KVTransferEngine`` backend (and the seed's send/recv) over TCP.

    Args:
        rank / world_size: this endpoint's rank among ``world_size``.
        endpoints: ``{rank: (host, port)}`` for every rank; port 0 for this
            rank picks a free port (read ``address`` after ``start``). Default:
            every rank on ``127.0.0.1`` (fill peers in with ``update_endpoints``,
            or build a whole group with ``local_group``).
        recv_timeout_s: bound of ``recv`` and of every socket operation.
        store_rank: the rank that serves the engine's control store.
        max_message_bytes / max_inbox_bytes / max_store_bytes /
        max_connections: the limits in the module docstring.
        idle_timeout_s: a served connection silent this long is closed.

    ``KVTransferEngine("socket", rank=..., world_size=..., endpoints=...)``
    builds and starts one; an instance can also be passed directly.
    """

    name = "socket"
    local = False

    def __init__(
        self,
        rank: int,
        world_size: int,
        endpoints: dict[int, tuple[str, int]] | None = None,
        *,
        recv_timeout_s: float = 5.0,
        store_rank: int = 0,
        max_message_bytes: int = 1 << 30,
        max_inbox_bytes: int = 256 << 20,
        max_store_bytes: int = 256 << 20,
        max_connections: int = 64,
        idle_timeout_s: float = 300.0,
    ) -> None:
        world_size = _int_arg("world_size", world_size, 1)
        rank = _int_arg("rank", rank, 0, world_size - 1)
        store_rank = _int_arg("store_rank", store_rank, 0, world_size - 1)
        if endpoints is None:
            endpoints = {r: ("127.0.0.1", 0) for r in range(world_size)}
        if not isinstance(endpoints, dict) or set(endpoints) != set(range(world_size)):
            raise KVConfigError("endpoints must contain all ranks [0..world_size-1]")
        eps = {r: _endpoint(r, ep) for r, ep in endpoints.items()}
        for name, v in (("recv_timeout_s", recv_timeout_s), ("idle_timeout_s", idle_timeout_s)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise KVConfigError(f"{name} must be a number > 0, got {v!r}")
        for name in ("max_message_bytes", "max_inbox_bytes", "max_store_bytes", "max_connections"):
            _int_arg(name, locals()[name], 1)
        self.rank, self.world_size, self.store_rank = rank, world_size, store_rank
        self._endpoints = eps
        self.recv_timeout_s = float(recv_timeout_s)
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_message_bytes = max_message_bytes
        self.max_inbox_bytes = max_inbox_bytes
        self.max_store_bytes = max_store_bytes
        self.max_connections = max_connections
        self._local_store = (
            LocalStore(self.recv_timeout_s, max_store_bytes) if rank == store_rank else None
        )
        self.store: Any = self._local_store or RemoteStore(self)
        self._cond = threading.Condition()
        self._posted: dict[tuple[int, int], _Slot] = {}
        self._inbox: dict[tuple[int, int], bytearray] = {}
        self._inbox_bytes = 0
        self._idle: dict[int, list[socket.socket]] = {}
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._running = False
        self._closed = False
        self._seed_seq: dict[tuple[str, int], int] = {}
        #: typed errors of bad frames received (most recent last)
        self.protocol_errors: deque[KVCacheError] = deque(maxlen=64)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> SocketTransferBackend:
        """Listen on this rank's endpoint (idempotent); returns ``self``."""
        if self._closed:
            raise KVConfigError("this SocketTransferBackend was closed; build a new one")
        if self._running:
            return self
        host, port = self._endpoints[self.rank]
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind((host, port))
            lst.listen(128)
        except OSError as exc:
            lst.close()
            raise KVConfigError(f"rank {self.rank} cannot listen on {host}:{port}: {exc}") from None
        lst.settimeout(0.2)
        self._listener = lst
        self._endpoints[self.rank] = (host, lst.getsockname()[1])
        self._running = True
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"kv-socket-rank-{self.rank}", daemon=True
        )
        self._accept_thread.start()
        return self

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` this rank listens on (the real port once started)."""
        return self._endpoints[self.rank]

    @property
    def endpoints(self) -> dict[int, tuple[str, int]]:
        return dict(self._endpoints)

    def update_endpoints(self, endpoints: dict[int, tuple[str, int]]) -> None:
        """Set peers' addresses (e.g. once their ephemeral ports are known)."""
        if not isinstance(endpoints, dict):
            raise KVConfigError("endpoints must be a dict {rank: (host, port)}")
        new = {}
        for r, ep in endpoints.items():
            _int_arg("rank", r, 0, self.world_size - 1)
            new[r] = _endpoint(r, ep)
        if self._running and new.get(self.rank, self.address) != self.address:
            raise KVConfigError(f"rank {self.rank} already listens on {self.address}")
        new.pop(self.rank, None)
        self._endpoints.update(new)

    @classmethod
    def local_group(cls, world_size: int, **kwargs: Any) -> list[SocketTransferBackend]:
        """``world_size`` started backends on 127.0.0.1 that know each other's ports."""
        group: list[SocketTransferBackend] = []
        try:
            for r in range(_int_arg("world_size", world_size, 1)):
                group.append(cls(r, world_size, **kwargs).start())
        except BaseException:
            for b in group:
                b.close()
            raise
        eps = {b.rank: b.address for b in group}
        for b in group:
            b.update_endpoints(eps)
        return group

    def close(self) -> None:
        """Stop serving, close every socket and wake every waiter (idempotent)."""
        with self._cond:
            if self._closed:
                return
            self._closed, self._running = True, False
            for slot in self._posted.values():
                slot.state, slot.error = 3, KVTransferFailedError("the backend was closed")
            self._posted.clear()
            self._inbox.clear()
            self._inbox_bytes = 0
            self._cond.notify_all()
        if self._local_store is not None:
            self._local_store.close()
        if self._listener is not None:
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=2.0)
        with self._cond:
            socks = list(self._conns) + [s for v in self._idle.values() for s in v]
            self._idle.clear()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in list(self._threads):
            t.join(timeout=2.0)

    def __enter__(self) -> SocketTransferBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- seed API ----------------------------------------------------------------
    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return self.world_size

    def send(self, tensor: Any, dst_rank: int) -> None:
        """Send ``tensor``'s bytes to ``dst_rank``; returns once it holds them."""
        self.check_peer(dst_rank)
        seq = self._seed_seq.get(("s", dst_rank), 0)
        self.expose(dst_rank, SEED_TAG_BASE | seq, tensor).wait(self.recv_timeout_s)
        self._seed_seq[("s", dst_rank)] = seq + 1

    def recv(self, tensor: Any, src_rank: int) -> None:
        """Fill ``tensor`` with the next message from ``src_rank`` (its byte size
        must match; a ``bytearray`` takes the message's size)."""
        self.check_peer(src_rank)
        seq = self._seed_seq.get(("r", src_rank), 0)
        key = (src_rank, SEED_TAG_BASE | seq)
        if isinstance(tensor, bytearray):
            tensor[:] = self._take(key, self.recv_timeout_s)
        else:
            self.fetch(src_rank, key[1], tensor).wait(self.recv_timeout_s)
        self._seed_seq[("r", src_rank)] = seq + 1

    # -- engine interface ------------------------------------------------------------
    def _require_started(self) -> None:
        if not self._running:
            raise KVConfigError("SocketTransferBackend is not started (call start())")

    def check_peer(self, peer: int) -> None:
        self._require_started()
        if isinstance(peer, bool) or not isinstance(peer, int):
            raise KVInvalidTypeError(f"rank must be an int, got {type(peer).__name__}")
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise KVTransferFailedError(
                f"rank {peer} is not a peer of rank {self.rank} (world size {self.world_size})"
            )
        if self._endpoints[peer][1] == 0:
            raise KVConfigError(f"the port of rank {peer} is unknown; call update_endpoints")

    def expose(self, peer: int, tag: int, tensor: Any) -> _Done:
        """Send the bytes to ``peer`` under ``tag``; done when the peer holds them."""
        self.check_peer(peer)
        tag = _int_arg("tag", tag, 0, (1 << 64) - 1)
        view = _in_view(tensor)
        if len(view) > self.max_message_bytes:
            raise KVInvalidInputError(
                f"a message of {len(view)} bytes exceeds max_message_bytes={self.max_message_bytes}"
            )
        self._rpc(peer, OP_DATA, "", tag, view, self.recv_timeout_s)
        return _Done()

    def fetch(self, peer: int, tag: int, out: Any) -> Any:
        """Post ``out`` for ``peer``'s message ``tag``; ``wait`` until it is filled."""
        self.check_peer(peer)
        tag = _int_arg("tag", tag, 0, (1 << 64) - 1)
        view, bounce = _out_view(out)
        key = (peer, tag)
        with self._cond:
            buf = self._inbox.pop(key, None)
            if buf is not None:
                self._inbox_bytes -= len(buf)
                self._cond.notify_all()
            elif key in self._posted:
                raise KVInvalidInputError(f"message {tag} from rank {peer} is already posted")
            else:
                slot = _Slot(view)
                self._posted[key] = slot
                return _FetchWork(self, key, slot, out, bounce)
        if len(buf) != len(view):
            return _Done(size_error(tag, peer, len(buf), len(view)))
        view[:] = buf
        _copy_back(out, bounce)
        return _Done()

    def _take(self, key: tuple[int, int], timeout_s: float) -> bytearray:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while key not in self._inbox:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise KVTransferTimeoutError(
                        f"no message from rank {key[0]} within {timeout_s:.3f} s", peer=key[0]
                    )
                self._cond.wait(left)
            buf = self._inbox.pop(key)
            self._inbox_bytes -= len(buf)
            self._cond.notify_all()
            return buf

    # -- client side ---------------------------------------------------------------
    def _checkout(self, peer: int) -> socket.socket:
        with self._cond:
            idle = self._idle.get(peer, [])
            while idle:
                s = idle.pop()
                # an idle connection with something to read was closed by the peer
                if not select.select([s], [], [], 0)[0]:
                    return s
                s.close()
        try:
            s = socket.create_connection(self._endpoints[peer], timeout=self.recv_timeout_s)
        except TimeoutError:
            raise KVTransferTimeoutError(
                f"connecting to rank {peer} timed out", peer=peer
            ) from None
        except OSError as exc:
            raise KVTransferFailedError(f"cannot reach rank {peer}: {exc}", peer=peer) from None
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _rpc(
        self,
        peer: int,
        op: int,
        key: str,
        arg: int,
        value: Any,
        wait_s: float = 0.0,
        max_response: int = MAX_ERROR_BYTES,
    ) -> tuple[int, bytes]:
        self._require_started()
        head = encode_request(op, key.encode("ascii"), self.rank, arg, len(value))
        s = self._checkout(peer)
        keep = False
        try:
            s.settimeout(self.recv_timeout_s + wait_s)
            try:
                s.sendall(head)
                if len(value):
                    s.sendall(value)
            except TimeoutError:
                raise KVTransferTimeoutError(
                    f"sending to rank {peer} timed out", peer=peer
                ) from None
            except OSError as exc:
                raise KVTransferFailedError(
                    f"sending to rank {peer} failed: {exc}", peer=peer
                ) from None
            what = f"response of rank {peer} to {OP_NAMES[op]}"
            status, n = decode_response(recv_exact(s, RESPONSE_STRUCT.size, what), what, peer)
            limit = MAX_ERROR_BYTES if status == ST_ERROR else max_response
            if n > limit:
                raise protocol_error(f"{what}: {n} bytes, at most {limit}", peer=peer)
            body = recv_exact(s, n, what)
            keep = status != ST_ERROR  # the server closes after an error
        finally:
            pooled = False
            if keep:
                with self._cond:
                    idle = self._idle.setdefault(peer, [])
                    if len(idle) < _MAX_IDLE_PER_PEER and not self._closed:
                        idle.append(s)
                        pooled = True
            if not pooled:
                s.close()
        if status == ST_ERROR:
            code, msg = decode_error(body)
            cls = (
                KVTransferTimeoutError
                if code == KVTransferTimeoutError.code
                else KVTransferFailedError
            )
            raise cls(f"rank {peer}: {msg}", peer=peer, remote_code=code)
        return status, body

    @property
    def inbox_bytes(self) -> int:
        """Bytes of messages received but not fetched yet."""
        return self._inbox_bytes

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("listening" if self._running else "not started")
        return (
            f"SocketTransferBackend(rank={self.rank}, world_size={self.world_size}, "
            f"address={self.address}, {state})"
        )
