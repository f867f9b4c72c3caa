"""The transport interface under ``KVTransferEngine`` and the default control store.

A backend moves opaque byte buffers; the engine owns the protocol (header,
chunks, checksum, ack) and the pools. A backend has:

* ``rank`` / ``world_size`` and a ``store`` (the control plane: a c10d
  ``Store`` with ``set/get/check/wait/compare_set/delete_key``) for
  distributed backends; ``local = True`` for the in-process one;
* ``expose(peer, tag, tensor) -> Work``: make ``tensor`` available to
  ``peer`` under ``tag`` (gloo/NCCL: ``isend``; a one-sided transport such
  as NIXL registers it and publishes its descriptor for the peer to READ);
* ``fetch(peer, tag, out) -> Work``: fill ``out`` with what ``peer`` exposed
  under ``tag`` (gloo/NCCL: ``irecv``; one-sided: READ);
* ``expose_many`` / ``fetch_many``: the same for a window of messages at
  once (default: one call each; NIXL answers a window with one READ);
* ``Work.wait(timeout_s)``: block at most ``timeout_s``; a dead peer raises
  ``KVTransferFailedError``, a silent one ``KVTransferTimeoutError``.

Every wait takes the caller's remaining time: nothing here ever waits on a
library default (gloo's is 30 minutes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ...errors import KVConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["AllOf", "TransferBackend", "Work", "default_store"]


class Work(Protocol):
    def wait(self, timeout_s: float) -> None: ...


class AllOf:
    """Several works waited on as one (each wait gets the time that is left)."""

    __slots__ = ("works",)

    def __init__(self, works: list[Any]) -> None:
        self.works = works

    def wait(self, timeout_s: float) -> None:
        import time

        deadline = time.monotonic() + timeout_s
        for w in self.works:
            w.wait(max(deadline - time.monotonic(), 0.0))


class TransferBackend:
    """Base class; see the module docstring for the contract."""

    name = "base"
    local = False
    #: the engine may move CUDA tensors straight from/into pool memory
    direct_cuda = False
    #: direct-mode messages per ``expose_many`` / ``fetch_many`` call
    batch_messages = 1
    #: most groups of direct-mode messages a receiver posts at once (None: as
    #: many as the engine's window holds); see ``pipeline.move_direct``
    groups_in_flight: int | None = None
    #: the direct-mode message size (bytes) this transport moves host memory
    #: best at; None: the engine's ``plan.DIRECT_MAX_MESSAGE_BYTES``. Used unless
    #: the engine's ``direct_max_message_bytes`` is set.
    host_message_bytes: int | None = None
    rank: int = 0
    world_size: int = 1
    store: Any = None

    def expose(self, peer: int, tag: int, tensor: torch.Tensor) -> Work:  # pragma: no cover
        raise NotImplementedError

    def fetch(self, peer: int, tag: int, out: torch.Tensor) -> Work:  # pragma: no cover
        raise NotImplementedError

    def expose_many(self, peer: int, tags: Sequence[int], tensors: Sequence[Any]) -> Work:
        """``expose`` of each message; one work for all of them."""
        works = [self.expose(peer, t, x) for t, x in zip(tags, tensors)]
        return works[0] if len(works) == 1 else AllOf(works)

    def fetch_many(self, peer: int, tags: Sequence[int], outs: Sequence[Any]) -> Work:
        """``fetch`` of each message; one work for all of them."""
        works = [self.fetch(peer, t, x) for t, x in zip(tags, outs)]
        return works[0] if len(works) == 1 else AllOf(works)

    def progress(self) -> None:
        """Let the transport move messages in flight while the caller computes
        (a transport progressed only by its caller's polls needs it)."""

    def check_peer(self, peer: int) -> None:
        """Raise ``KVTransferFailedError`` if the link to ``peer`` is known to be unusable."""

    def close(self) -> None:
        """Release transport resources (registrations, groups this backend created)."""


def default_store() -> Any:
    """The c10d store of the default process group (the control plane of the
    torch and NIXL backends when none is given)."""
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception as exc:  # pragma: no cover - depends on how the group was made
        raise KVConfigError(
            "no c10d store found for the default process group; pass store= to the backend"
        ) from exc
