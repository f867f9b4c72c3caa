"""SocketTransferBackend: KVTransferEngine over TCP on 127.0.0.1, hostile frames,
and CommTransferBackendAdapter over a small in-process comm object.

Two endpoints run as two threads of this process (one test uses a subprocess,
ended by the test). Every wait is bounded; no outcome depends on timing.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from sagellm_kv_cache.errors import (
    KVChecksumMismatchError,
    KVConfigError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from sagellm_kv_cache.testing.faults import inject_faults
from sagellm_kv_cache.transfer import KVTransferEngine
from sagellm_kv_cache.transfer.backends.comm_adapter import CommTransferBackendAdapter
from sagellm_kv_cache.transfer.backends.socket import SocketTransferBackend
from sagellm_kv_cache.transfer.backends.socket_frames import (
    REQUEST_MAGIC,
    REQUEST_STRUCT,
    RESPONSE_STRUCT,
    LocalStore,
)
from tests._transfer_harness import (
    BS,
    accounting,
    digest,
    fill,
    make_pool,
    prompt,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair():
    b0, b1 = SocketTransferBackend.local_group(2, recv_timeout_s=5.0)
    try:
        yield b0, b1
    finally:
        b0.close()
        b1.close()


def run_receiver(fn):
    """Run ``fn`` in a thread; returns a getter that joins (bounded) and re-raises."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def get():
        t.join(timeout=60)
        assert not t.is_alive(), "receiver thread did not finish"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return get


# -- the engine over sockets ------------------------------------------------------------
@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
def test_handle_blocks_arrive_bit_exact_in_another_pool(pair, direct):
    b0, b1 = pair
    kw = {"direct_min_message_bytes": 0} if direct else {"chunk_bytes": 512}
    src_pool, dst_pool = make_pool(), make_pool()
    tokens = prompt(1)
    h, kv = fill(src_pool, tokens, seed=1)
    with (
        KVTransferEngine(b0, timeout_s=10, **kw) as e0,
        KVTransferEngine(b1, timeout_s=10, **kw) as e1,
    ):
        e0.register_pool(src_pool)
        get = run_receiver(lambda: e1.receive(dst_pool, timeout_s=20))
        tid = e0.transfer_kv_handle(h, 0, 1)
        got = get()
        assert e0.get_transfer_metadata(tid)["status"] == "completed"
        assert got.record.status.value == "completed"
        (rh,) = got.handles
        assert rh.num_tokens == len(tokens)
        assert digest(dst_pool.read_kv(rh)) == digest(kv)
        assert e0.get_metrics()["backend"] == "socket"
        dst_pool.free(rh)
    # the 6 full blocks are cached on the receiver: a new request hits 24 tokens
    h2, hit = dst_pool.alloc_with_prefix(tokens)
    assert hit == 24
    assert digest(dst_pool.read_kv(h2, num_tokens=24)) == digest(kv[:, :, :24])
    assert b1.inbox_bytes == 0 and list(b1.protocol_errors) == []


def test_make_backend_by_name_builds_a_started_socket_backend():
    with SocketTransferBackend(0, 1) as only:  # a one-rank group to find a port
        assert only.address[0] == "127.0.0.1" and only.address[1] > 0
    e = KVTransferEngine("socket", rank=0, world_size=1, timeout_s=1)
    try:
        assert e.backend.name == "socket" and e.backend.address[0] == "127.0.0.1"
        assert e.rank == 0
    finally:
        e.close()


def test_corrupted_transfer_is_all_or_nothing(pair):
    b0, b1 = pair
    src_pool, dst_pool = make_pool(), make_pool()
    tokens = prompt(2)
    h, _ = fill(src_pool, tokens, seed=2)
    before = accounting(dst_pool)
    with (
        KVTransferEngine(b0, timeout_s=10, max_retries=0, chunk_bytes=512) as e0,
        KVTransferEngine(b1, timeout_s=10, chunk_bytes=512) as e1,
    ):
        e0.register_pool(src_pool)

        def flip(stage, chunk=None, index=None, **_):
            if stage == "chunk_received" and index == 1:
                chunk[3] ^= 0x10

        inject_faults(e1, flip)
        get = run_receiver(lambda: e1.receive(dst_pool, timeout_s=20))
        with pytest.raises(KVChecksumMismatchError) as ei:
            e0.transfer_kv_handle(h, 0, 1)
        assert ei.value.code == "KV_CHECKSUM_MISMATCH"
        with pytest.raises(KVChecksumMismatchError):
            get()
    assert accounting(dst_pool) == before
    assert dst_pool.match_prefix(tokens)[1] == 0


@pytest.mark.parametrize("room", [16, 8])
def test_a_fetch_posted_while_its_message_is_read_gets_it(pair, monkeypatch, room):
    """The race behind a lost message: the fetch is posted after the server
    found no slot for the message but before the bytes were put in the inbox.
    The fetch still gets them (or the typed size error), and nothing stays
    reserved in the inbox."""
    from sagellm_kv_cache.transfer.backends import socket_server

    b0, b1 = pair
    out = torch.zeros(room, dtype=torch.uint8)
    works: list = []
    real = socket_server.recv_into

    def read_then_post(sock, view, what):
        real(sock, view, what)
        if not works:  # the first DATA frame went to the inbox path: post now
            works.append(b1.fetch(0, 7, out))

    monkeypatch.setattr(socket_server, "recv_into", read_then_post)
    data = torch.arange(16, dtype=torch.uint8)
    if room == 16:
        b0.expose(1, 7, data).wait(5.0)
        works[0].wait(5.0)
        assert torch.equal(out, data)
    else:
        with pytest.raises(KVTransferFailedError, match="has 16 bytes, the buffer 8"):
            b0.expose(1, 7, data).wait(5.0)
        with pytest.raises(KVTransferFailedError, match="has 16 bytes, the buffer 8"):
            works[0].wait(5.0)
    assert b1.inbox_bytes == 0 and b1._inbox == {} and b1._posted == {}


def test_seed_send_recv_in_order_with_tensor_and_bytearray(pair):
    b0, b1 = pair
    assert (b0.get_rank(), b0.get_world_size(), b1.get_rank()) == (0, 2, 1)
    a = torch.arange(12, dtype=torch.float32)
    b0.send(a, 1)  # returns once rank 1 holds the bytes (no recv posted yet)
    b0.send(b"hello", 1)
    out = torch.empty(12, dtype=torch.float32)
    b1.recv(out, 0)
    assert torch.equal(out, a)
    buf = bytearray()
    b1.recv(buf, 0)
    assert bytes(buf) == b"hello"
    assert b1.inbox_bytes == 0
    with pytest.raises(KVTransferTimeoutError) as ei:
        b1._take((0, 99), 0.05)
    assert ei.value.code == "KV_TRANSFER_TIMEOUT"


def test_size_mismatch_and_bad_arguments_are_typed(pair):
    b0, b1 = pair
    b0.send(torch.zeros(4, dtype=torch.uint8), 1)
    with pytest.raises(KVTransferFailedError, match="has 4 bytes"):
        b1.recv(torch.empty(8, dtype=torch.uint8), 0)
    for bad, exc, code in (
        ("1", KVInvalidTypeError, "KV_INVALID_TYPE"),
        (True, KVInvalidTypeError, "KV_INVALID_TYPE"),
        (0, KVTransferFailedError, "KV_TRANSFER_FAILED"),  # itself
        (5, KVTransferFailedError, "KV_TRANSFER_FAILED"),
    ):
        with pytest.raises(exc) as ei:
            b0.send(b"x", bad)
        assert ei.value.code == code
    with pytest.raises(KVInvalidTypeError):
        b0.send(object(), 1)
    with pytest.raises(KVInvalidTypeError):
        b1.recv(b"read-only", 0)
    for kwargs in (
        {"rank": 2, "world_size": 2},
        {"rank": 0, "world_size": 2, "endpoints": {0: ("127.0.0.1", 0)}},
        {"rank": 0, "world_size": 1, "endpoints": {0: ("127.0.0.1", 70000)}},
        {"rank": 0, "world_size": 1, "recv_timeout_s": 0},
    ):
        with pytest.raises((KVConfigError, KVInvalidInputError)):
            SocketTransferBackend(**kwargs)
    unstarted = SocketTransferBackend(0, 2)
    with pytest.raises(KVConfigError, match="not started"):
        unstarted.send(b"x", 1)


# -- hostile input on the socket -------------------------------------------------------------
def raw_request(op=1, key=b"", src=0, arg=0, value_len=0, magic=REQUEST_MAGIC, version=1):
    return REQUEST_STRUCT.pack(magic, version, op, len(key), src, arg, value_len) + key


def talk(backend: SocketTransferBackend, payload: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the response (status, body); the server then closes."""
    with socket.create_connection(backend.address, timeout=5) as s:
        s.sendall(payload)
        head = b""
        while len(head) < RESPONSE_STRUCT.size:
            chunk = s.recv(RESPONSE_STRUCT.size - len(head))
            if not chunk:
                break
            head += chunk
        _m, _v, status, _p, n = RESPONSE_STRUCT.unpack(head)
        body = s.recv(n) if n else b""
        # closed after the error (a reset when unread bytes were left)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(1) == b""
        return status, body


@pytest.mark.parametrize(
    "payload, field",
    [
        (raw_request(magic=b"EVIL"), "magic"),
        (raw_request(version=9), "version"),
        (raw_request(op=77), "op"),
        (raw_request(src=1), "src_rank"),  # its own rank
        (raw_request(src=7), "src_rank"),
        (raw_request(op=1, key=b"k"), "key_len"),
        (raw_request(op=1, src=0, value_len=1 << 40), "value_len"),  # oversize DATA
        (raw_request(op=2, key=b"k", value_len=1 << 40), "value_len"),  # oversize SET
    ],
)
def test_bad_frames_get_a_typed_error_and_nothing_is_allocated(pair, payload, field):
    b0, b1 = pair
    status, body = talk(b1, payload)
    assert status == 2 and body.startswith(b"KV_TRANSFER_FAILED\0")
    (err,) = list(b1.protocol_errors)
    assert isinstance(err, KVTransferFailedError) and err.details["field"] == field
    assert b1.inbox_bytes == 0
    # still serving: the seed path works afterwards
    b0.send(b"ok", 1)
    buf = bytearray()
    b1.recv(buf, 0)
    assert bytes(buf) == b"ok"


def test_short_frame_and_short_payload_are_typed_and_release_their_reservation(pair):
    b0, b1 = pair
    with socket.create_connection(b1.address, timeout=5) as s:  # half a header
        s.sendall(raw_request()[:10])
    with socket.create_connection(b1.address, timeout=5) as s:  # 100 of 4096 declared bytes
        s.sendall(raw_request(op=1, src=0, arg=5, value_len=4096) + b"x" * 100)
    # a DATA frame larger than the inbox with no posted fetch: refused after recv_timeout_s
    b0.send(b"sync", 1)  # this one is served after both broken connections ended
    buf = bytearray()
    b1.recv(buf, 0)
    for _ in range(200):  # the server threads record their errors as their sockets close
        if len(b1.protocol_errors) == 2:
            break
        threading.Event().wait(0.01)
    errs = list(b1.protocol_errors)
    assert len(errs) == 2 and all(isinstance(e, KVTransferFailedError) for e in errs)
    assert {("connection closed" in e.message) for e in errs} == {True}
    assert b1.inbox_bytes == 0 and (0, 5) not in b1._inbox


def test_data_beyond_the_inbox_limit_waits_for_room_then_is_refused():
    b0, b1 = SocketTransferBackend.local_group(2, recv_timeout_s=0.3, max_inbox_bytes=64)
    try:
        b0.send(b"a" * 60, 1)  # fits
        with pytest.raises(KVTransferTimeoutError) as ei:  # 60 + 60 > 64, nobody fetches
            b0.send(b"b" * 60, 1)
        assert ei.value.details["remote_code"] == "KV_TRANSFER_TIMEOUT"
        assert b1.inbox_bytes == 60
        buf = bytearray()
        b1.recv(buf, 0)
        assert bytes(buf) == b"a" * 60 and b1.inbox_bytes == 0
        # larger than the whole inbox: lands only in a posted buffer
        out = torch.empty(100, dtype=torch.uint8)
        work = b1.fetch(0, 7, out)
        b0.expose(1, 7, torch.full((100,), 3, dtype=torch.uint8)).wait(1)
        work.wait(5)
        assert int(out.sum()) == 300 and b1.inbox_bytes == 0
    finally:
        b0.close()
        b1.close()


def test_a_hostile_server_response_is_a_typed_error():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)

    def evil():
        conn, _ = lst.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(struct.pack("<4sBBHQ", b"SKVR", 1, 0, 0, 1 << 40))  # absurd length

    t = threading.Thread(target=evil, daemon=True)
    t.start()
    b0 = SocketTransferBackend(0, 2, {0: ("127.0.0.1", 0), 1: lst.getsockname()}).start()
    try:
        with pytest.raises(KVTransferFailedError, match="at most"):
            b0.send(b"x", 1)
    finally:
        b0.close()
        t.join(timeout=5)
        lst.close()


def test_local_store_semantics_and_bound():
    st = LocalStore(timeout_s=0.05, max_bytes=32)
    assert st.compare_set("k", b"", b"v1") == b"v1"
    assert st.compare_set("k", b"", b"v2") == b"v1"  # someone set it first
    assert st.compare_set("k", b"v1", b"v3") == b"v3"
    assert st.check(["k"]) and not st.check(["k", "z"])
    with pytest.raises(KVTransferTimeoutError, match="timed out"):
        st.wait(["z"])
    with pytest.raises(KVTransferFailedError, match="store full"):
        st.set("big", b"x" * 64)
    assert not st.check(["big"]) and st.delete_key("k") and st.nbytes == 0
    with pytest.raises(KVInvalidInputError):
        st.set("", b"x")


def test_transfer_to_a_subprocess_receiver():
    code = textwrap.dedent(
        f"""
        import hashlib, sys, torch
        from sagellm_kv_cache.pool import KVPool
        from sagellm_kv_cache.storage import ModelShape
        from sagellm_kv_cache.transfer import KVTransferEngine
        from sagellm_kv_cache.transfer.backends.socket import SocketTransferBackend
        port0 = int(sys.argv[1])
        b = SocketTransferBackend(1, 2, {{0: ("127.0.0.1", port0), 1: ("127.0.0.1", 0)}}).start()
        print(b.address[1], flush=True)
        pool = KVPool(num_blocks=64, block_size={BS}, model_shape=ModelShape(2, 2, 8, "float16"))
        with KVTransferEngine(b, timeout_s=20) as e:
            got = e.receive(pool, timeout_s=30)
            kv = pool.read_kv(got.handles[0])
        print(hashlib.sha256(kv.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
        """
    )
    b0 = SocketTransferBackend(0, 2).start()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(b0.address[1])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        port1 = int(lines.get(timeout=60))
        b0.update_endpoints({1: ("127.0.0.1", port1)})
        pool = make_pool()
        h, kv = fill(pool, prompt(5), seed=5)
        with KVTransferEngine(b0, timeout_s=20) as e0:
            e0.register_pool(pool)
            e0.transfer_kv_handle(h, 0, 1)
            assert lines.get(timeout=60).strip() == digest(kv)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        b0.close()


# -- CommTransferBackendAdapter ------------------------------------------------------------------
class QueueComm:
    """A two-rank in-process comm object: send puts a copy, recv takes the next one."""

    def __init__(self, rank: int, links: dict, store) -> None:
        self.rank, self.links, self.store = rank, links, store

    def send(self, tensor, dst_rank):
        self.links[(self.rank, dst_rank)].put(tensor.detach().clone())

    def recv(self, tensor, src_rank):
        tensor.copy_(self.links[(src_rank, self.rank)].get(timeout=10).view(tensor.dtype))

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return 2


def test_comm_adapter_moves_a_handle_bit_exact():
    links = {(0, 1): queue.Queue(), (1, 0): queue.Queue()}
    store = LocalStore()
    a0 = CommTransferBackendAdapter(QueueComm(0, links, store), interconnect="tcp")
    a1 = CommTransferBackendAdapter(QueueComm(1, links, store))
    assert (a0.interconnect, a1.interconnect) == ("tcp", "rdma")
    assert (a0.get_rank(), a1.get_rank(), a0.get_world_size()) == (0, 1, 2)
    src_pool, dst_pool = make_pool(), make_pool()
    h, kv = fill(src_pool, prompt(3), seed=3)
    with (
        KVTransferEngine(a0, timeout_s=10, chunk_bytes=512) as e0,
        KVTransferEngine(a1, timeout_s=10, chunk_bytes=512) as e1,
    ):
        e0.register_pool(src_pool)
        get = run_receiver(lambda: e1.receive(dst_pool, timeout_s=20))
        e0.transfer_kv_handle(h, 0, 1)
        (rh,) = get().handles
        assert digest(dst_pool.read_kv(rh)) == digest(kv)
    # seed pass-throughs
    a0b = CommTransferBackendAdapter(QueueComm(0, links, store))
    a0b.send(torch.tensor([7], dtype=torch.int64), 1)
    out = torch.empty(1, dtype=torch.int64)
    CommTransferBackendAdapter(QueueComm(1, links, store)).recv(out, 0)
    assert int(out) == 7


def test_comm_adapter_bad_input_and_bounded_waits():
    with pytest.raises(KVConfigError) as ei:
        CommTransferBackendAdapter(None)
    assert ei.value.code == "KV_CONFIG_INVALID"
    with pytest.raises(KVConfigError, match="recv"):
        CommTransferBackendAdapter(
            type("C", (), {"send": lambda *a: None, "get_rank": lambda s: 0})()
        )

    class Silent:
        store = LocalStore()

        def send(self, t, d):
            pass

        def recv(self, t, s):
            threading.Event().wait(0.5)  # never delivers in time

        def get_rank(self):
            return 1

    a = CommTransferBackendAdapter(Silent())
    assert a.get_world_size() == -1 and a.world_size == 3
    with pytest.raises(KVTransferTimeoutError):
        a.fetch(0, 0, torch.empty(1)).wait(0.01)
    with pytest.raises(KVTransferFailedError, match="unusable"):
        a.fetch(0, 1, torch.empty(1))
    with pytest.raises(KVTransferFailedError):
        a.expose(1, 0, torch.empty(1))  # itself
    a.close()
