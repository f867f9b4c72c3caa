"""Fault injection for ``KVTransferEngine`` tests: a backend that wraps the real one.

::

    from sagellm_kv_cache.testing.faults import inject_faults

    def flip(stage, chunk=None, index=None, **_):
        if stage == "chunk_received" and index == 1:
            chunk[3] ^= 0x10               # a bit flipped on the way in

    inject_faults(engine, flip)            # engine.backend is now wrapped
    inject_faults(engine, None)            # no more faults

``hook(stage, **info)`` runs where bytes or verdicts cross the transport:

=================  ======================================================
stage              where (``info``)
=================  ======================================================
``header``         sender, the header is published (``key``)
``ready``          receiver, blocks allocated, before it says OK (``key``)
``chunk_sent``     sender, after hashing, before the message is exposed
                   (``chunk``: its bytes, ``index``: message number)
``chunk_received`` receiver, the message landed, before it is checked and
                   hashed (``chunk``, ``index``)
``before_ack``     receiver, verified, before it acknowledges (``key``)
``local_chunk``    in-process, a piece was copied / a chunk carried to the
                   destination, before its checksum (``chunk``, ``index``)
=================  ======================================================

The engine has no hooks of its own: what a hook does (flip a bit, sleep past
a timeout, raise, kill the process) happens to the engine exactly as a bad
link, a slow peer or a crash would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..transfer.backends.base import TransferBackend

__all__ = ["FaultyBackend", "inject_faults"]

Hook = Callable[..., Any]


def _flat(t: Any) -> Any:
    import torch

    return t.reshape(-1).view(torch.uint8)


class _Store:
    """The control store, with the protocol's verdict points reported to the hook."""

    def __init__(self, inner: Any, owner: FaultyBackend) -> None:
        self._inner = inner
        self._owner = owner

    def set(self, key: str, value: Any) -> None:
        self._inner.set(key, value)
        if key.endswith("/hdr"):
            self._owner.fire("header", key=key)

    def compare_set(self, key: str, expected: Any, desired: Any) -> Any:
        if expected == b"" and bytes(desired).startswith(b"OK"):
            if key.endswith("/ready"):
                self._owner.fire("ready", key=key)
            elif key.endswith("/ack"):
                self._owner.fire("before_ack", key=key)
        return self._inner.compare_set(key, expected, desired)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Landed:
    """A receive whose messages are shown to the hook once they landed."""

    __slots__ = ("items", "owner", "work")

    def __init__(self, work: Any, owner: FaultyBackend, items: list[tuple[Any, int]]) -> None:
        self.work = work
        self.owner = owner
        self.items = items

    def wait(self, timeout_s: float) -> None:
        self.work.wait(timeout_s)
        for out, tag in self.items:
            self.owner.fire("chunk_received", chunk=_flat(out), index=tag & 0xFFFF)


class FaultyBackend(TransferBackend):
    """``inner`` with ``hook`` called at the stages of the module docstring."""

    def __init__(self, inner: Any, hook: Hook | None = None) -> None:
        self.inner = inner
        self.hook = hook
        self.name = inner.name
        self.local = inner.local
        self.direct_cuda = getattr(inner, "direct_cuda", False)
        self.batch_messages = getattr(inner, "batch_messages", 1)
        self.groups_in_flight = getattr(inner, "groups_in_flight", None)
        self.rank = getattr(inner, "rank", 0)
        self.world_size = getattr(inner, "world_size", 1)
        store = getattr(inner, "store", None)
        self.store = None if store is None else _Store(store, self)

    def fire(self, stage: str, **info: Any) -> None:
        if self.hook is not None:
            self.hook(stage, **info)

    # -- distributed data plane ----------------------------------------------
    def expose(self, peer: int, tag: int, tensor: Any) -> Any:
        self.fire("chunk_sent", chunk=_flat(tensor), index=tag & 0xFFFF)
        return self.inner.expose(peer, tag, tensor)

    def expose_many(self, peer: int, tags: Sequence[int], tensors: Sequence[Any]) -> Any:
        for t, x in zip(tags, tensors):
            self.fire("chunk_sent", chunk=_flat(x), index=t & 0xFFFF)
        return self.inner.expose_many(peer, tags, tensors)

    def fetch(self, peer: int, tag: int, out: Any) -> Any:
        return _Landed(self.inner.fetch(peer, tag, out), self, [(out, tag)])

    def fetch_many(self, peer: int, tags: Sequence[int], outs: Sequence[Any]) -> Any:
        return _Landed(self.inner.fetch_many(peer, tags, outs), self, list(zip(outs, tags)))

    # -- in-process data plane -------------------------------------------------
    def copy_into(self, dst: Any, src: Any, index: int) -> None:
        self.inner.copy_into(dst, src, index)
        self.fire("local_chunk", chunk=_flat(dst), index=index)

    def carry(self, chunk: Any, device: str, index: int) -> Any:
        moved = self.inner.carry(chunk, device, index)
        self.fire("local_chunk", chunk=_flat(moved), index=index)
        return moved

    def progress(self) -> None:
        self.inner.progress()

    def check_peer(self, peer: int) -> None:
        self.inner.check_peer(peer)

    def close(self) -> None:
        self.inner.close()


def inject_faults(engine: Any, hook: Hook | None) -> FaultyBackend:
    """Wrap ``engine``'s backend (once) and make ``hook`` its fault hook."""
    backend = engine.backend
    if isinstance(backend, FaultyBackend):
        backend.hook = hook
        return backend
    wrapped = FaultyBackend(backend, hook)
    engine.use_backend(wrapped)
    return wrapped
