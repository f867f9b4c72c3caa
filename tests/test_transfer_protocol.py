"""``PeerSequences``: the per-pair numbering both ends of a transfer or fetch agree on,
and the one polling loop (``wait_posted``) the receiver and the remote accessor use."""

from __future__ import annotations

import threading
import time

from sagellm_kv_cache.transfer.protocol import PeerSequences


class DictStore:
    """The part of a ``torch.distributed`` store the protocol uses, over a dict."""

    def __init__(self) -> None:
        self.d: dict[str, bytes] = {}

    def check(self, keys: list[str]) -> bool:
        return all(k in self.d for k in keys)

    def get(self, key: str) -> bytes:
        return self.d[key]

    def delete_key(self, key: str) -> bool:
        return self.d.pop(key, None) is not None


def key_of(peer: int, seq: int) -> str:
    return f"hdr/{peer}/{seq}"


def test_take_posted_takes_each_peers_values_in_order():
    store, seqs = DictStore(), PeerSequences()
    store.d.update({"hdr/2/0": b"a", "hdr/2/1": b"b", "hdr/1/1": b"late"})
    assert seqs.take_posted(store, [1, 2], key_of) == (2, 0, b"a")  # peer 1's #0 not posted
    assert seqs.take_posted(store, [1, 2], key_of) == (2, 1, b"b")
    assert seqs.take_posted(store, [1, 2], key_of) is None  # 1's #1 waits for its #0
    store.d["hdr/1/0"] = b"first"
    assert seqs.take_posted(store, [1, 2], key_of) == (1, 0, b"first")
    assert seqs.take_posted(store, [1, 2], key_of) == (1, 1, b"late")
    assert store.d == {}  # every taken key deleted


def test_wait_posted_returns_a_value_posted_while_it_waits():
    store, seqs = DictStore(), PeerSequences()
    timer = threading.Timer(0.05, store.d.__setitem__, ("hdr/3/0", b"x"))
    timer.start()
    try:
        got = seqs.wait_posted(store, [3], key_of, time.monotonic() + 10)
    finally:
        timer.cancel()
    assert got == (3, 0, b"x")
    assert seqs.take(3) == 1  # the number moved past the taken value


def test_wait_posted_past_its_deadline_or_stopped_takes_nothing():
    store, seqs = DictStore(), PeerSequences()
    assert seqs.wait_posted(store, [1], key_of, time.monotonic() + 0.01) is None
    stop = threading.Event()
    stop.set()
    store.d["hdr/1/0"] = b"v"  # posted, but the caller stopped first
    assert seqs.wait_posted(store, [1], key_of, time.monotonic() + 10, stop) is None
    assert store.d == {"hdr/1/0": b"v"}  # left for the next call, number unchanged
    assert seqs.wait_posted(store, [1], key_of, time.monotonic() + 10) == (1, 0, b"v")
