"""How direct-mode messages are cut into groups (``pipeline.group_sizes``) and
how many groups a receiver keeps posted (``groups_in_flight``): exact sizes,
the call order a receiver makes, and the bytes and checksum that arrive."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sagellm_kv_cache.transfer.backends.base import TransferBackend
from sagellm_kv_cache.transfer.pipeline import TAPER_MIN_BYTES, group_sizes, move_direct

MIB = 1 << 20


@pytest.mark.parametrize(
    ("nbytes", "batch", "sizes"),
    [
        ([16 * MIB] * 64, 64, [1, 2, 4, 8, 17, 16, 8, 4, 2, 1, 1]),
        ([16 * MIB] * 64, 8, [1, 2, 5, 8, 8, 8, 8, 8, 8, 4, 2, 1, 1]),
        ([16 * MIB] * 9, 8, [1, 4, 2, 1, 1]),
        ([16 * MIB] * 3, 8, [1, 1, 1]),
        ([4 * MIB] * 16, 8, [1, 2, 5, 4, 2, 1, 1]),
        ([MIB] * 16, 8, [8, 4, 4]),  # the unit: four 1 MiB messages
        ([3 * MIB, MIB, 5 * MIB, 2 * MIB], 8, [2, 2]),
        ([64] * 64, 64, [64]),  # small messages: one group, one READ
        ([16 * MIB] * 5, 1, [1] * 5),
        ([], 8, []),
    ],
)
def test_group_sizes_exact(nbytes, batch, sizes):
    assert group_sizes(nbytes, batch) == sizes


@given(st.lists(st.integers(1, 4 * TAPER_MIN_BYTES), max_size=200), st.integers(1, 64))
def test_group_sizes_cover_every_message_once_in_few_groups(nbytes, batch):
    sizes = group_sizes(nbytes, batch)
    n = len(nbytes)
    assert sum(sizes) == n and all(1 <= s <= batch for s in sizes)
    # the ramps add at most two groups per doubling up to batch, and one short piece
    ramps = 2 * math.ceil(math.log2(batch)) + 2 if batch > 1 else 0
    assert len(sizes) <= math.ceil(n / batch) + ramps
    if n and nbytes[0] > TAPER_MIN_BYTES:  # a unit of one message: the receiver's last
        assert sizes[-1] == 1  # hash is of one message


@given(st.integers(1, 300), st.integers(1, 64))
def test_equal_big_messages_start_and_end_with_one(n, batch):
    sizes = group_sizes([16 * MIB] * n, batch)
    # the sender's first hash and the receiver's last are one message (two where
    # the short middle piece joined the first)
    assert sizes[-1] == 1 and sizes[0] <= 2
    if n >= 8 * batch:  # long enough for both ramps: groups of batch in the middle
        assert batch in sizes


class _Work:
    def __init__(self, on_wait=None) -> None:
        self.on_wait = on_wait

    def wait(self, timeout_s: float) -> None:
        if self.on_wait is not None:
            self.on_wait()


class _Loopback(TransferBackend):
    """Both sides in one process: ``expose_many`` keeps the tensors, a receiver's
    ``fetch_many`` copies them in when called (as NIXL's READ over shared memory
    runs inside the call) and records the calls in ``log``."""

    name = "loopback"
    batch_messages = 8

    def __init__(self, shared: dict, log: list, groups_in_flight: int | None) -> None:
        self.shared = shared
        self.log = log
        self.groups_in_flight = groups_in_flight

    def expose_many(self, peer, tags, tensors):
        for t, x in zip(tags, tensors):
            self.shared[t] = x
        self.log.append(("expose", tags[0] & 0xFFFF, len(tags)))
        return _Work()

    def fetch_many(self, peer, tags, outs):
        first = tags[0] & 0xFFFF
        for t, out in zip(tags, outs):
            out.copy_(self.shared[t])
        self.log.append(("fetch", first, len(tags)))
        return _Work(lambda: self.log.append(("landed", first)))

    def progress(self) -> None:
        pass


def _move(backend, algo: str, t: torch.Tensor, seq: int, *, send: bool, **kw):
    """``move_direct`` of the rows of ``t`` (one message each) between ranks 0 (the
    receiver) and 1, with 30 s and a window of 64 messages; the checksum it returns."""
    header = SimpleNamespace(checksum_algo=algo)
    peer = 1 if send else 0
    return move_direct(
        backend, header, list(t), peer, seq, time.monotonic() + 30, 64, send=send, **kw
    )


@pytest.mark.parametrize("algo", ["xxh3_64", "none"])
def test_a_receiver_hands_each_group_over_before_the_call_that_moves_the_next(algo):
    """16 messages of 4 MiB in groups of at most 8: 1, 2, 5, 4, 2, 1, 1. The sender
    exposes its whole window ahead; the receiver, one group in flight, waits for
    a group (handing it to its hashers) before it fetches the next. The bytes
    and the checksum match the sender's."""
    shared: dict = {}
    log: list = []
    g = torch.Generator().manual_seed(3)
    src = torch.randint(0, 255, (16, 4 * MIB), dtype=torch.uint8, generator=g)
    dst = torch.zeros_like(src)
    sender = _Loopback(shared, log, groups_in_flight=1)
    sent = _move(sender, algo, src, 7, send=True)
    firsts, sizes = [0, 1, 3, 8, 12, 14, 15], [1, 2, 5, 4, 2, 1, 1]
    assert log == [("expose", f, n) for f, n in zip(firsts, sizes)]
    log.clear()
    receiver = _Loopback(shared, log, groups_in_flight=1)
    got = _move(receiver, algo, dst, 7, send=False)
    order = [("fetch", 0, 1)]
    for prev, f, n in zip(firsts, firsts[1:], sizes[1:]):
        order += [("landed", prev), ("fetch", f, n)]
    order.append(("landed", 15))
    assert log == order
    assert torch.equal(dst, src) and got == sent


def test_without_a_cap_a_receiver_posts_its_whole_window():
    shared: dict = {}
    log: list = []
    src = torch.ones(16, 4 * MIB, dtype=torch.uint8)
    _move(_Loopback(shared, log, None), "none", src, 1, send=True)
    log.clear()
    dst = torch.zeros_like(src)
    _move(_Loopback(shared, log, None), "none", dst, 1, send=False)
    assert [e[0] for e in log] == ["fetch"] * 7 + ["landed"] * 7
    assert torch.equal(dst, src)


class _Polled(_Loopback):
    def progress(self) -> None:
        self.log.append(("progress",))


@pytest.mark.parametrize("kept", [False, True])
def test_a_hashing_sender_polls_its_transport_after_every_message(kept):
    """Without NIXL's progress thread a transport moves only inside our calls: the
    sender polls after each message it hashes (or looks up), so the groups it
    exposed before go out while it hashes the next."""
    log: list = []
    src = torch.ones(16, 4 * MIB, dtype=torch.uint8)
    digest = (lambda m, view: m) if kept else None
    _move(_Polled({}, log, 1), "xxh3_64", src, 1, send=True, source_digest=digest)
    want: list = []
    for f, n in zip([0, 1, 3, 8, 12, 14, 15], [1, 2, 5, 4, 2, 1, 1]):
        want += [("progress",)] * n + [("expose", f, n)]
    assert log == want


@pytest.mark.parametrize(("kw", "want"), [({}, False), ({"progress_thread": True}, True)])
def test_nixl_agent_runs_without_its_progress_thread_unless_asked(monkeypatch, kw, want):
    """NIXL's progress thread slowed a 1 GiB READ over shared memory 1.6x here
    (and each idle agent's thread slows the others); the engine polls itself."""
    nixl_cu12 = pytest.importorskip("nixl_cu12")
    import torch.distributed as dist

    from sagellm_kv_cache.transfer.backends.nixl import NixlBackend

    seen: list = []

    class Agent:
        def __init__(self, name, config):
            self.backends = ["UCX"]
            seen.append(config)

        def get_agent_metadata(self):
            return b"md"

    monkeypatch.setattr(nixl_cu12, "nixl_agent", Agent)
    b = NixlBackend(store=dist.HashStore(), rank=0, world_size=2, **kw)
    assert [c.enable_pthread for c in seen] == [want]
    assert b.groups_in_flight == 1


class _FailingGroup(_Loopback):
    """A receiver whose group starting at ``bad`` lands and then fails its wait."""

    bad = 3

    def fetch_many(self, peer, tags, outs):
        work = super().fetch_many(peer, tags, outs)
        if tags[0] & 0xFFFF == self.bad:

            def fail():
                raise RuntimeError("injected after landing")

            work.on_wait = fail
        return work


def test_a_group_that_fails_after_landing_is_reported_and_the_rest_still_arrive():
    """Sender and receiver meet over the grouped pipeline: a fault on one group
    (after its bytes landed) goes to ``errors`` and the stream goes on, every
    other group lands and is hashed, so the sender finishes and the verdict is
    typed; the failed group is never handed to the hashers."""
    shared: dict = {}
    g = torch.Generator().manual_seed(5)
    src = torch.randint(0, 255, (16, 4 * MIB), dtype=torch.uint8, generator=g)
    sent = _move(_Loopback(shared, [], 1), "xxh3_64", src, 2, send=True)
    log: list = []
    errors: list = []
    dst = torch.zeros_like(src)
    got = _move(_FailingGroup(shared, log, 1), "xxh3_64", dst, 2, send=False, errors=errors)
    assert [type(e) for e in errors] == [RuntimeError]
    assert [e[1] for e in log if e[0] == "fetch"] == [0, 1, 3, 8, 12, 14, 15]
    assert [e[1] for e in log if e[0] == "landed"] == [0, 1, 8, 12, 14, 15]  # 3 failed
    assert got != sent  # messages 3..7 were not hashed: the checksum cannot match
    assert torch.equal(dst, src)  # the loopback copied them all
