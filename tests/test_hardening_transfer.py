"""Hardening of KV transfers where sender, receiver, transport and launcher meet.

Most tests run both ranks in this process: ``LoopBackend`` is a two-rank
transport over a shared ``HashStore`` and an in-memory mailbox that behaves
like gloo where it matters (a message shorter than the posted receive lands
silently, the rest of the buffer keeps what it held; a longer one fails).
``hostile_send`` speaks the wire protocol by hand, so a test can send what an
honest engine never would. Every thread is a daemon joined with a timeout;
the engines' ``timeout_s`` is 60 s, so a test that passes never waited on a
timeout: a timeout would surface as a different error type.
"""

from __future__ import annotations

import threading
import time
import zlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from sagellm_kv_cache.errors import (
    KVChecksumMismatchError,
    KVConfigError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from sagellm_kv_cache.storage import ModelShape
from sagellm_kv_cache.testing.faults import inject_faults
from sagellm_kv_cache.transfer import KVTransferEngine
from sagellm_kv_cache.transfer.backends import TransferBackend
from sagellm_kv_cache.transfer.protocol import Keys as _Keys
from sagellm_kv_cache.transfer.protocol import tag as _tag
from sagellm_kv_cache.transfer.wire import (
    Checksum,
    Segment,
    TransferHeader,
    encode_header,
    encode_trailer,
)
from tests._transfer_harness import (
    BPB,
    BS,
    SHAPE,
    accounting,
    digest,
    fill,
    make_pool,
    prompt,
)

pytestmark = pytest.mark.timeout(60)

SLOW_S = 60.0  # every engine's timeout: never reached by a passing test
JOIN_S = 30.0


# -- a two-rank transport inside one process ----------------------------------------
class _Link:
    """What both fake ranks share: the control store and the exposed messages."""

    def __init__(self) -> None:
        self.store = dist.HashStore()
        self.cv = threading.Condition()
        self.msgs: dict[tuple[int, int, int], tuple[torch.Tensor, threading.Event]] = {}


class _Done:
    def __init__(self, event: threading.Event, peer: int) -> None:
        self.event, self.peer = event, peer

    def wait(self, timeout_s: float) -> None:
        if not self.event.wait(max(timeout_s, 0.0)):
            raise KVTransferTimeoutError(f"rank {self.peer} did not read in time")


class _Recv:
    def __init__(self, link: _Link, key: tuple[int, int, int], out: torch.Tensor) -> None:
        self.link, self.key, self.out = link, key, out

    def wait(self, timeout_s: float) -> None:
        with self.link.cv:
            if not self.link.cv.wait_for(lambda: self.key in self.link.msgs, max(timeout_s, 0)):
                raise KVTransferTimeoutError(f"message {self.key} did not arrive in time")
            data, done = self.link.msgs.pop(self.key)
        src = data.reshape(-1).view(torch.uint8)
        dst = self.out.reshape(-1).view(torch.uint8)
        try:
            if src.numel() > dst.numel():  # gloo: "Received data size doesn't match"
                raise KVTransferFailedError(f"message of {src.numel()} bytes > {dst.numel()}")
            dst[: src.numel()].copy_(src)  # shorter: the tail keeps what it held (gloo)
        finally:
            done.set()


class LoopBackend(TransferBackend):
    """Rank ``rank`` of a two-rank in-process transport; ``mangle(tag, tensor)``
    may replace what this rank sends (a hostile or broken sender)."""

    name = "loop"

    def __init__(self, link: _Link, rank: int, mangle=None) -> None:
        self.link, self.rank, self.world_size, self.store = link, rank, 2, link.store
        self.mangle = mangle

    def expose(self, peer: int, tag: int, tensor: torch.Tensor) -> _Done:
        data = self.mangle(tag, tensor) if self.mangle else tensor
        done = threading.Event()
        with self.link.cv:
            self.link.msgs[(self.rank, peer, tag)] = (data, done)
            self.link.cv.notify_all()
        return _Done(done, peer)

    def fetch(self, peer: int, tag: int, out: torch.Tensor) -> _Recv:
        return _Recv(self.link, (peer, self.rank, tag), out)


def pair(sender_kw=None, receiver_kw=None, mangle=None, num_blocks: int = 32):
    """(sender engine, its pool, receiver engine, its pool) on one link."""
    link = _Link()
    kw = {"timeout_s": SLOW_S, "max_retries": 0, "chunk_bytes": 2 * BPB}
    s = KVTransferEngine(LoopBackend(link, 0, mangle), **{**kw, **(sender_kw or {})})
    r = KVTransferEngine(LoopBackend(link, 1), **{**kw, **(receiver_kw or {})})
    sp, rp = make_pool(num_blocks), make_pool(num_blocks)
    s.register_pool(sp)
    r.register_pool(rp)
    return s, sp, r, rp


def in_thread(fn, *args, **kwargs):
    """Start ``fn`` on a daemon thread; returns ``join()`` -> (value, exception)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # reported to the test
            out["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join():
        t.join(JOIN_S)
        assert not t.is_alive(), f"{fn.__name__} still running after {JOIN_S} s"
        return out.get("value"), out.get("exc")

    return join


def send_and_receive(s, sp, r, rp, tokens, seed=1):
    """One transfer of ``tokens``' handle from s to r: (tid or exc, received or exc)."""
    h, kv = fill(sp, tokens, seed)
    join = in_thread(r.receive, rp, timeout_s=JOIN_S)
    try:
        sent = s.transfer_kv_handle(h, 0, 1)
    except KVTransferFailedError as exc:
        sent = exc
    got, rexc = join()
    return sent, rexc or got, kv


# -- a sender that speaks the protocol by hand ----------------------------------------
def make_header(shape: ModelShape = SHAPE, bs: int = BS, num_blocks: int = 2, **kw):
    bpb = shape.bytes_per_block(bs)
    fields = dict(
        transfer_id=11,
        src_rank=0,
        dst_rank=1,
        block_size=bs,
        dtype=shape.dtype,
        layout="NHD",
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        segments=[
            Segment(num_blocks * bs, num_blocks, [bytes([i]) * 8 for i in range(num_blocks)])
        ],
        chunk_nbytes=[bpb] * num_blocks,
        blocks_per_chunk=1,
        checksum_algo="xxh3_64",
    )
    fields.update(kw)
    return TransferHeader(**fields)


def hostile_send(link, raw_header: bytes, chunks=(), trailer=None, header=None, seq=0):
    """Send ``raw_header``; when the receiver is ready, expose ``chunks`` (bytes)
    and write ``trailer`` (default: the right one for ``header``). Returns
    (ready status, ack status); a status the receiver never wrote is None."""
    backend = LoopBackend(link, 0)
    keys = _Keys(0, 1, seq)
    st = link.store
    st.set(keys.hdr, raw_header)
    try:
        st.wait([keys.ready], timedelta(seconds=JOIN_S))
    except Exception:
        return None, None
    ready = bytes(st.get(keys.ready))
    if not ready.startswith(b"OK"):
        return ready, None
    cs = Checksum(header.checksum_algo if header else "none")
    works = []
    for c, data in enumerate(chunks):
        cs.update(data)
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        works.append(backend.expose(1, _tag(seq, c), t))
    for w in works:
        w.wait(JOIN_S)
    if trailer is None:
        trailer = encode_trailer(
            header.transfer_id, header.num_chunks, header.checksum_algo, cs.value()
        )
    st.set(keys.trl, trailer)
    try:
        st.wait([keys.ack], timedelta(seconds=JOIN_S))
    except Exception:
        return ready, None
    return ready, bytes(st.get(keys.ack))


def code_of(status: bytes | None) -> str | None:
    return None if status is None else status.decode().partition(":")[0]


# -- defect 2: the receiver enforces its own integrity policy ------------------------------
def test_receiver_that_requires_a_checksum_refuses_a_sender_without_one():
    flips = []

    def flip(stage, chunk=None, index=None, **_):
        if stage == "chunk_sent" and index == 1:
            flips.append(index)
            chunk[3] ^= 0x10

    s, sp, r, rp = pair(sender_kw={"enable_checksum": False})
    inject_faults(s, flip)
    before = accounting(rp)
    sent, got, _ = send_and_receive(s, sp, r, rp, prompt(1))
    # the sender is told at once, before any payload moved
    assert type(sent) is KVTransferFailedError
    assert sent.details["remote_code"] == KVConfigError.code
    assert "checksum" in sent.message
    assert flips == []
    assert type(got) is KVTransferFailedError and got.details["remote_code"] == KVConfigError.code
    assert accounting(rp) == before
    assert rp.match_prefix(prompt(1))[1] == 0


def test_receiver_without_a_checksum_policy_still_verifies_one_that_is_sent():
    s, sp, r, rp = pair(receiver_kw={"enable_checksum": False})
    inject_faults(
        s,
        lambda stage, chunk=None, index=None, **_: (
            chunk.__setitem__(0, chunk[0] ^ 1) if index == 2 else None
        ),
    )
    before = accounting(rp)
    sent, got, _ = send_and_receive(s, sp, r, rp, prompt(2))
    assert type(sent) is KVChecksumMismatchError
    assert type(got) is KVChecksumMismatchError
    assert accounting(rp) == before


def _truncate_message(n: int, short_by: int):
    def mangle(tag, tensor):
        if tag & 0xFFFF == n:
            return tensor.reshape(-1).view(torch.uint8)[:-short_by].clone()
        return tensor

    return mangle


@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "no-checksum"])
@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
def test_short_payload_is_refused_and_nothing_lands(checksum, direct):
    kw = {"enable_checksum": checksum, "direct_min_message_bytes": 0 if direct else 1 << 40}
    s, sp, r, rp = pair(sender_kw=kw, receiver_kw=kw)
    # a first transfer leaves its bytes in the receiver's staging buffers
    sent, _, _ = send_and_receive(s, sp, r, rp, prompt(3))
    assert isinstance(sent, int), sent
    s.backend.mangle = _truncate_message(1, 10)
    before = accounting(rp)
    sent, got, _ = send_and_receive(s, sp, r, rp, prompt(4))
    assert type(sent) is KVTransferFailedError
    assert sent.details["remote_code"] == KVTransferFailedError.code
    assert type(got) is KVTransferFailedError and "short" in got.message
    assert got.details["field"] == "length"
    assert accounting(rp) == before
    assert rp.match_prefix(prompt(4))[1] == 0


# -- defect 10 (zlib half): decompression is bounded by the declared size --------------
BIG = ModelShape(num_layers=2, num_kv_heads=4, head_dim=64, dtype="float16")
BIG_BS = 16


def test_zlib_bomb_is_refused_without_inflating_it():
    import tracemalloc

    bpb = BIG.bytes_per_block(BIG_BS)  # 32 KiB
    bomb = zlib.compress(b"\0" * (60 << 20), 9)  # 60 MiB of zeros in ~60 KB
    assert bpb < len(bomb) <= 2 * bpb  # within the wire limit of a one-block chunk
    ok = zlib.compress(b"\1" * bpb, 1)
    header = make_header(BIG, BIG_BS, 2, chunk_nbytes=[len(ok), len(bomb)], compression="zlib")
    link = _Link()
    r = KVTransferEngine(LoopBackend(link, 1), timeout_s=SLOW_S)
    pool = make_pool(8, BIG, BIG_BS)
    r.register_pool(pool)
    before = accounting(pool)
    join = in_thread(r.receive, pool, timeout_s=JOIN_S)
    tracemalloc.start()
    try:
        _, ack = hostile_send(link, encode_header(header), [ok, bomb], header=header)
        _, got = join()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code_of(ack) == KVTransferFailedError.code
    assert type(got) is KVTransferFailedError and got.details["field"] == "compression"
    assert peak < 4 << 20  # the 60 MiB were never produced
    assert accounting(pool) == before


# -- defect 11: every receiver failure reaches the sender as its own typed error ---------
def test_undecompressable_chunk_is_reported_and_the_checksum_retry_lands():
    kw = {"compression": "zlib", "max_retries": 1, "retry_backoff_ms": 1}
    s, sp, r, rp = pair(sender_kw=kw, receiver_kw=kw)
    inject_faults(r, _corrupt_first_arrival())
    tokens = prompt(5)
    h, kv = fill(sp, tokens, seed=5)
    join = in_thread(r.serve, rp, num_transfers=2, idle_timeout_s=JOIN_S)
    tid = s.transfer_kv_handle(h, 0, 1)  # raises on a timeout: a different outcome
    records, exc = join()
    assert exc is None
    meta = s.get_transfer_metadata(tid)
    assert (meta["status"], meta["retries"]) == ("completed", 1)
    assert [rec.error_code for rec in records] == [KVChecksumMismatchError.code, None]
    h2, hit = rp.alloc_with_prefix(tokens)
    assert hit == 24 and digest(rp.read_kv(h2, num_tokens=24)) == digest(kv[:, :, :24])
    rp.free(h2)
    assert accounting(rp)["used_blocks"] == 0


def test_undecompressable_chunk_without_checksums_fails_fast_and_typed():
    kw = {"compression": "zlib", "enable_checksum": False}
    s, sp, r, rp = pair(sender_kw=kw, receiver_kw=kw)
    inject_faults(
        r,
        lambda stage, chunk=None, index=None, **_: (
            chunk.__setitem__(slice(2, 10), 0xFF)
            if stage == "chunk_received" and index == 0
            else None
        ),
    )
    before = accounting(rp)
    sent, got, _ = send_and_receive(s, sp, r, rp, prompt(6))
    # not KVTransferTimeoutError; not retryable: the bytes arrived as they were sent
    assert type(sent) is KVTransferFailedError
    assert sent.details["remote_code"] == KVTransferFailedError.code
    assert "does not decompress" in sent.message
    assert type(got) is KVTransferFailedError and got.details["field"] == "compression"
    assert accounting(rp) == before


def test_bad_trailer_is_reported_to_the_sender():
    link = _Link()
    r = KVTransferEngine(LoopBackend(link, 1), timeout_s=SLOW_S)
    pool = make_pool(32)
    r.register_pool(pool)
    before = accounting(pool)
    header = make_header()
    join = in_thread(r.receive, pool, timeout_s=JOIN_S)
    bad = encode_trailer(header.transfer_id + 1, header.num_chunks, "xxh3_64", 0)
    ready, ack = hostile_send(link, encode_header(header), [b"\0" * BPB] * 2, bad, header)
    _, got = join()
    assert code_of(ready) == "OK"
    assert code_of(ack) == KVTransferFailedError.code and b"another transfer" in ack
    assert type(got) is KVTransferFailedError
    assert accounting(pool) == before


def test_receiver_side_exception_mid_stream_is_reported_to_the_sender():
    s, sp, r, rp = pair()

    def boom(stage, index=None, **_):
        if stage == "chunk_received" and index == 1:
            raise RuntimeError("receiver bug")

    inject_faults(r, boom)
    before = accounting(rp)
    sent, got, _ = send_and_receive(s, sp, r, rp, prompt(7))
    assert type(sent) is KVTransferFailedError
    assert "RuntimeError" in sent.message
    assert isinstance(got, RuntimeError)
    assert accounting(rp) == before


# -- hostile headers: refused before anything is allocated, the sender told ----------------
def _patched(index: int, value) -> bytes:
    from sagellm_kv_cache.transfer.wire import HEADER_STRUCT

    raw = encode_header(make_header())
    fields = list(HEADER_STRUCT.unpack_from(raw, 0))
    fields[index] = value
    return HEADER_STRUCT.pack(*fields) + raw[HEADER_STRUCT.size :]


HOSTILE_HEADERS = [
    ("garbage", b"\x00" * 64, KVTransferFailedError.code),
    ("truncated", encode_header(make_header())[:-3], KVTransferFailedError.code),
    ("num-blocks-huge", _patched(7, 1 << 30), KVTransferFailedError.code),
    ("num-tokens-huge", _patched(8, 1 << 62), KVTransferFailedError.code),
    ("num-hashes-over-blocks", _patched(22, 3), KVTransferFailedError.code),
    ("routed-elsewhere", encode_header(make_header(dst_rank=5)), KVTransferFailedError.code),
    ("other-geometry", encode_header(make_header(ModelShape(2, 2, 16))), KVConfigError.code),
    ("no-checksum", encode_header(make_header(checksum_algo="none")), KVConfigError.code),
    (
        "more-blocks-than-the-pool",
        encode_header(
            make_header(
                num_blocks=40,
                segments=[Segment(160, 40, [])],
                chunk_nbytes=[BPB] * 40,
            )
        ),
        "KV_BUDGET_EXCEEDED",
    ),
]


@pytest.mark.parametrize(
    ("raw", "code"), [c[1:] for c in HOSTILE_HEADERS], ids=[c[0] for c in HOSTILE_HEADERS]
)
def test_hostile_header_is_refused_with_nothing_allocated(raw, code):
    link = _Link()
    r = KVTransferEngine(LoopBackend(link, 1), timeout_s=SLOW_S)
    pool = make_pool(32)
    r.register_pool(pool)
    before = accounting(pool)
    join = in_thread(r.receive, pool, timeout_s=JOIN_S)
    ready, ack = hostile_send(link, raw)
    _, got = join()
    assert code_of(ready) == code and ack is None
    assert type(got) is KVTransferFailedError
    assert got.details.get("remote_code", got.code) == code
    assert accounting(pool) == before
    assert r.get_metrics()["failed"] == 1


# -- defect 9: the launcher's control store listens on loopback only ----------------------
def listen_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on TCP ``port`` (from /proc/net/tcp*)."""
    import socket

    out = set()
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            hexaddr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(hexaddr)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out.add(socket.inet_ntop(family, raw))
    return out


def rank_store_listeners(ctx):
    return sorted(listen_addresses(ctx.store.underlying_store.port))


def test_launched_ranks_control_store_listens_on_loopback_only():
    from sagellm_kv_cache.testing.launcher import launch

    (res,) = launch(rank_store_listeners, 1, timeout_s=60)
    assert res.ok, res.error
    assert res.value == ["127.0.0.1"]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_make_store_listens_on_the_named_address_only(host):
    from sagellm_kv_cache.testing.launcher import make_store

    store = make_store(host, timeout_s=5)
    try:
        assert listen_addresses(store.port) == {host}
        store.set("k", b"v")
        client = dist.TCPStore(
            "127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=5)
        )
        assert client.get("k") == b"v"
        del client
    finally:
        del store


def test_make_store_with_an_unknown_host_is_a_config_error():
    from sagellm_kv_cache.testing.launcher import make_store

    with pytest.raises(KVConfigError, match=r"no\.such\.host\.invalid"):
        make_store("no.such.host.invalid")


# -- defect 16 (a, b): NIXL bookkeeping, with a fake agent (no nixl_cu12 needed) ----------
class FakeAgent:
    """Records registrations; READs stay in ``state`` until a test changes it."""

    def __init__(self, name: str) -> None:
        self.backends = ["UCX"]
        self.name = name
        self.registered: dict[int, tuple] = {}
        self.remotes: list[bytes] = []
        self.notifs: dict = {}
        self.state = "PROC"
        self.released: list = []
        self._n = 0

    def get_agent_metadata(self) -> bytes:
        return f"md:{self.name}".encode()

    def register_memory(self, regions, mem_type):
        self._n += 1
        self.registered[self._n] = tuple(regions)
        return self._n

    def deregister_memory(self, descs) -> None:
        del self.registered[descs]

    def add_remote_agent(self, md) -> bytes:
        self.remotes.append(bytes(md))
        return bytes(md)[3:]

    def remove_remote_agent(self, name) -> None:
        pass

    def get_xfer_descs(self, what, mem_type=None):
        return ("descs", what if isinstance(what, list) else what.data_ptr())

    def initialize_xfer(self, op, local, remote, peer, notif):
        self._n += 1
        return ("xfer", self._n)

    def transfer(self, handle) -> str:
        return "PROC"

    def check_xfer_state(self, handle) -> str:
        return self.state

    def release_xfer_handle(self, handle) -> None:
        self.released.append(handle)

    def get_new_notifs(self) -> dict:
        out, self.notifs = self.notifs, {}
        return out

    def send_notif(self, name, msg) -> None:
        pass


def nixl_pair(group: str = "default", store=None):
    from sagellm_kv_cache.transfer.backends.nixl import NixlBackend

    store = store if store is not None else dist.HashStore()
    made = []
    for rank in (0, 1):
        made.append(
            NixlBackend(
                store=store,
                rank=rank,
                world_size=2,
                group=group,
                agent=FakeAgent(f"{group}-{rank}"),
                connect_timeout_s=5,
            )
        )
    return store, made


def test_nixl_abandoned_transfer_deregisters_its_memory():
    _, (b0, _) = nixl_pair()
    pool_kv = torch.zeros(4096, dtype=torch.uint8)
    staging = torch.zeros(1024, dtype=torch.uint8)
    live = b0.expose(1, _tag(1, 0), pool_kv[:512])  # another transfer, still in flight
    fetch = b0.fetch(1, _tag(2, 0), staging)
    b0.expose(1, _tag(2, 1), pool_kv[512:1024])  # same failed transfer
    assert len(b0._agent.registered) == 2
    with pytest.raises(KVTransferTimeoutError):
        fetch.wait(0.01)  # no descriptor: the transfer fails here
    # the staging buffer is free of NIXL; pool memory a live message uses stays
    assert [r[0][0] for r in b0._agent.registered.values()] == [pool_kv.data_ptr()]
    assert b0._pending == {} and list(b0._live) == [live.id]
    b0._abandon(live)
    assert b0._agent.registered == {} and b0._live == {}
    b0.close()


def test_nixl_timed_out_read_keeps_its_memory_until_nixl_is_done_with_it():
    from sagellm_kv_cache.transfer.backends.nixl_desc import desc_message

    _, (b0, _) = nixl_pair()
    out = torch.zeros(256, dtype=torch.uint8)
    fetch = b0.fetch(1, _tag(3, 0), out)
    # the sender's descriptor arrives: the READ is posted and stays in progress
    desc = desc_message(_tag(3, 0), 9, [(0x1000, 256, 0, 0)], b"")
    b0._agent.notifs = {b"default-1": [desc]}
    with pytest.raises(KVTransferTimeoutError):
        fetch.wait(0.01)
    assert len(b0._agent.registered) == 1  # the READ may still write into out
    assert b0._agent.released == []
    b0._agent.state = "DONE"
    b0._poll_locked()
    assert b0._agent.registered == {} and len(b0._agent.released) == 1
    b0.close()


def test_nixl_backends_of_distinct_groups_pair_up_in_any_order():
    from sagellm_kv_cache.transfer.backends.nixl import NixlBackend

    store = dist.HashStore()
    mk = lambda rank, group: NixlBackend(  # noqa: E731
        store=store, rank=rank, world_size=2, group=group, agent=FakeAgent(f"{group}-{rank}")
    )
    a0, b0 = mk(0, "a"), mk(0, "b")
    b1, a1 = mk(1, "b"), mk(1, "a")  # the other order on rank 1
    for mine, peer in ((a0, "a-1"), (b0, "b-1"), (a1, "a-0"), (b1, "b-0")):
        mine.expose(1 - mine.rank, 1, torch.zeros(8, dtype=torch.uint8))
        assert mine._agent.remotes == [f"md:{peer}".encode()]
    with pytest.raises(KVConfigError, match="already live"):
        mk(0, "a")
    a0.close()
    mk(0, "a").close()  # a closed backend's group is free again
    for b in (b0, a1, b1):
        b.close()


# -- defects 2, 11 over gloo: the same promises between real processes ---------------------
GLOO_SCENARIOS = [
    # name, sender options, receiver options, transfers the receiver handles
    ("no-checksum", {"enable_checksum": False}, {}, 1),
    ("short", {"enable_checksum": False}, {"enable_checksum": False}, 1),
    ("zlib-retry", {"compression": "zlib", "max_retries": 1, "retry_backoff_ms": 1}, {}, 2),
]


def _short_sender(expose):
    """``expose`` that sends message 1 of each transfer 10 bytes short."""
    return lambda peer, tag, t: expose(peer, tag, t[:-10] if tag & 0xFFFF == 1 else t)


def _corrupt_first_arrival():
    """A receiver fault hook that breaks the first chunk to arrive, once."""
    seen = []

    def hook(stage, chunk=None, index=None, **_):
        if stage == "chunk_received" and not seen:
            seen.append(index)
            chunk[2:10] = 0xFF  # a deflate stream no longer decodes

    return hook


def rank_gloo_scenarios(ctx):
    out = {}
    for i, (name, sender_kw, receiver_kw, num_transfers) in enumerate(GLOO_SCENARIOS):
        dist.barrier()
        pool = make_pool(64)
        kw = {"timeout_s": SLOW_S, "max_retries": 0, "chunk_bytes": 2 * BPB}
        kw["direct_min_message_bytes"] = 1 << 40  # staged: chunks through staging buffers
        kw.update(sender_kw if ctx.rank == 0 else receiver_kw)
        eng = KVTransferEngine("torch", **kw)
        eng.register_pool(pool)
        tokens = prompt(50 + i)
        if ctx.rank == 0:
            h, kv = fill(pool, tokens, seed=i)
            if name == "short":
                eng.backend.expose = _short_sender(eng.backend.expose)
            try:
                tid = eng.transfer_kv_handle(h, 0, 1)
                res = {"meta": eng.get_transfer_metadata(tid)}
            except KVTransferFailedError as exc:
                res = {"type": type(exc).__name__, "remote_code": exc.details.get("remote_code")}
            res["digest"] = digest(kv[:, :, :24])
        else:
            before = accounting(pool)
            if name == "zlib-retry":
                inject_faults(eng, _corrupt_first_arrival())
            records = eng.serve(pool, num_transfers=num_transfers, idle_timeout_s=SLOW_S)
            h2, hit = pool.alloc_with_prefix(tokens)
            res = {
                "codes": [r.error_code for r in records],
                "errors": [r.error for r in records],
                "hit": hit,
                "digest": digest(pool.read_kv(h2, num_tokens=hit)) if hit else None,
            }
            pool.free(h2)
            res["unchanged"] = accounting(pool) == before
        eng.close()
        out[name] = res
    return out


@pytest.mark.timeout(120)
def test_gloo_receiver_enforces_its_policy_and_reports_failures_typed():
    from sagellm_kv_cache.testing.launcher import launch

    results = launch(rank_gloo_scenarios, 2, timeout_s=100)
    for r in results:
        assert r.ok, f"rank {r.rank}: {r.status} {r.error}"
    sender, receiver = (r.value for r in results)
    # a sender without checksums is refused by a receiver that requires them
    assert sender["no-checksum"]["type"] == "KVTransferFailedError"
    assert sender["no-checksum"]["remote_code"] == KVConfigError.code
    assert receiver["no-checksum"]["codes"] == [KVTransferFailedError.code]
    assert receiver["no-checksum"]["hit"] == 0 and receiver["no-checksum"]["unchanged"]
    # gloo lands a short message silently: the receiver's length check refuses it
    assert sender["short"]["type"] == "KVTransferFailedError"
    assert sender["short"]["remote_code"] == KVTransferFailedError.code
    assert "short" in receiver["short"]["errors"][0]
    assert receiver["short"]["hit"] == 0 and receiver["short"]["unchanged"]
    # a chunk that does not inflate reaches the sender as a checksum mismatch: retried
    assert sender["zlib-retry"]["meta"]["status"] == "completed"
    assert sender["zlib-retry"]["meta"]["retries"] == 1
    assert receiver["zlib-retry"]["codes"] == [KVChecksumMismatchError.code, None]
    assert receiver["zlib-retry"]["hit"] == 24
    assert receiver["zlib-retry"]["digest"] == sender["zlib-retry"]["digest"]


def test_nixl_group_of_messages_is_one_notification_and_one_read():
    from sagellm_kv_cache.transfer.backends.nixl_desc import desc_message

    _, (b0, b1) = nixl_pair()
    sent, reads = [], []
    b0._agent.send_notif = lambda name, msg: sent.append(bytes(msg))
    b1._agent.initialize_xfer = lambda op, local, remote, peer, notif: (
        reads.append((op, local, remote)) or ("xfer", 1)
    )
    src = torch.arange(3 * 64, dtype=torch.uint8)
    views = [src[i * 64 : (i + 1) * 64] for i in range(3)]
    tags = [_tag(4, m) for m in range(3)]
    b0.expose_many(1, tags, views)
    assert len(sent) == 1
    entries = [(v.data_ptr(), 64, 0, 0) for v in views]
    md = b"md:default-0"  # new memory: the agent's metadata rides along
    assert sent[0] == desc_message(tags[0], 1, entries, md)
    outs = [torch.empty(64, dtype=torch.uint8) for _ in range(3)]
    b1._agent.notifs = {b"default-0": sent}
    b1._connect_locked(0)
    fw = b1.fetch_many(0, tags, outs)
    assert len(reads) == 1 and reads[0][0] == "READ"
    assert reads[0][2] == ("descs", [(v.data_ptr(), 64, 0) for v in views])
    assert fw.handle == ("xfer", 1)
    # a group whose tags do not count up is refused before anything is sent
    with pytest.raises(KVTransferFailedError):
        b0.expose_many(1, [tags[0], tags[2]], views[:2])
    assert len(sent) == 1
    b0.close()
    b1.close()


def test_sender_reuses_kept_digests_and_a_stale_one_costs_one_retry(monkeypatch):
    import sagellm_kv_cache.transfer.digests as digests_mod

    direct = {"direct_min_message_bytes": 0}
    s, sp, r, rp = pair(sender_kw={**direct, "max_retries": 1}, receiver_kw=direct)
    tokens = prompt(9, 32)  # 8 full blocks: every direct message holds cached blocks only
    h, _ = fill(sp, tokens, seed=9)
    hashed: list[int] = []
    real = digests_mod.digest
    monkeypatch.setattr(digests_mod, "digest", lambda a, b: hashed.append(1) or real(a, b))

    def send_once():
        rp.reset()
        join = in_thread(r.receive, rp, timeout_s=JOIN_S, keep_handles=False)
        tid = s.transfer_kv_handle(h, 0, 1)
        _, exc = join()
        return tid, exc

    tid, exc = send_once()
    first = len(hashed)
    assert exc is None and first == 4  # 2 layers x K/V, one message each: hashed once
    tid, exc = send_once()
    assert exc is None and len(hashed) == first  # the kept digests, nothing re-hashed
    assert s.get_transfer_metadata(tid)["retries"] == 0
    # the source bytes change under the same block hashes (what immutability forbids):
    # the receiver sees a mismatch, the retry hashes afresh, the new bytes land
    sp.storage.kv.add_(1)
    rp.reset()
    join = in_thread(r.serve, rp, num_transfers=2, idle_timeout_s=JOIN_S)
    tid = s.transfer_kv_handle(h, 0, 1)
    records, exc = join()
    assert exc is None
    assert s.get_transfer_metadata(tid)["retries"] == 1
    assert [rec.error_code for rec in records] == [KVChecksumMismatchError.code, None]
    h2, hit = rp.alloc_with_prefix(tokens)
    assert hit == 32 and torch.equal(rp.read_kv(h2), sp.read_kv(h))


@pytest.mark.parametrize(("batch", "reads"), [(None, 1), (16, 4), (64, 1)])
def test_nixl_direct_messages_go_in_groups_of_batch_messages(batch, reads):
    """64 direct-mode messages: one descriptor notification and one READ by
    default (``batch_messages=MAX_BATCH``), four of each with 16 per group."""
    from types import SimpleNamespace

    from sagellm_kv_cache.transfer.backends.nixl import NixlBackend
    from sagellm_kv_cache.transfer.backends.nixl_desc import DESC, MAX_BATCH
    from sagellm_kv_cache.transfer.pipeline import move_direct

    store = dist.HashStore()
    kw = {} if batch is None else {"batch_messages": batch}
    b0, b1 = (
        NixlBackend(store=store, rank=r, world_size=2, agent=FakeAgent(f"default-{r}"), **kw)
        for r in (0, 1)
    )
    assert MAX_BATCH == 64 and b0.batch_messages == (batch or MAX_BATCH)
    sent: list[bytes] = []
    b0._agent.send_notif = lambda name, msg: sent.append(bytes(msg))
    b0._completed.update(range(1, reads + 1))  # the reader's completions, already here
    header = SimpleNamespace(checksum_algo="none")
    src = torch.arange(64 * 64, dtype=torch.int32).view(torch.uint8).view(64, -1)
    move_direct(b0, header, list(src), 1, 5, time.monotonic() + 5, 64, send=True)
    assert [DESC.unpack_from(m)[2] for m in sent] == [64 // reads] * reads

    posted: list = []
    real_init = b1._agent.initialize_xfer
    b1._agent.initialize_xfer = lambda *a: posted.append(a) or real_init(*a)
    b1._agent.notifs = {b"default-0": sent}
    b1._agent.state = "DONE"
    out = torch.zeros_like(src)
    move_direct(b1, header, list(out), 0, 5, time.monotonic() + 5, 64, send=False)
    assert len(posted) == reads and b1._pending == {}
    b0.close()
    b1.close()


@pytest.mark.parametrize("bad", [0, 65, True, 2.0])
def test_nixl_batch_messages_out_of_range_is_a_config_error(bad):
    from sagellm_kv_cache.transfer.backends.nixl import NixlBackend

    with pytest.raises(KVConfigError, match="batch_messages"):
        NixlBackend(
            store=dist.HashStore(), rank=0, world_size=2, agent=FakeAgent("x-0"), batch_messages=bad
        )
