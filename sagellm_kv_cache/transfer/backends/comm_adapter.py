"""``CommTransferBackendAdapter`` (seed API): a communication object as a backend.

The seed wraps a ``sagellm-comm`` ``CommBackend`` (``send(tensor, dst_rank)``,
``recv(tensor, src_rank)``, ``get_rank()``, optionally ``get_world_size()``)
so ``KVTransferEngine`` can move KV over it. Here it becomes a
``TransferBackend`` (``backends.py``): ``expose`` is a ``send``, ``fetch`` a
``recv``, in the order the engine posts them (sender and receiver post the
chunks of a transfer in the same order, so tags are not needed on a
two-sided, ordered link).

Every wait is bounded: the comm object's calls run on two worker threads
(one for sends, one for receives, so a rank can do both at once) and
``Work.wait(timeout_s)`` gives up after ``timeout_s`` with
``KVTransferTimeoutError``. A comm call that never returns keeps its worker
busy; later calls of that direction then time out as well (the link is
marked broken and ``check_peer`` says so).

The engine's control plane needs a store (``set/get/check/wait/
compare_set/delete_key``): pass ``store=``, or the comm object's own
``store`` attribute is used; ``socket_frames.LocalStore`` serves two
adapters in one process.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from ...errors import (
    KVCacheError,
    KVConfigError,
    KVInvalidTypeError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from .._args import check_rank
from .base import TransferBackend


def _check_peer_args(buffer: Any, rank: Any, name: str) -> None:
    """A caller's rank and buffer, checked before the comm object sees them."""
    import torch

    check_rank(name, rank)
    if not isinstance(buffer, torch.Tensor | bytearray | memoryview):
        raise KVInvalidTypeError(
            f"buffer must be a torch.Tensor, bytearray or memoryview, got {type(buffer).__name__}"
        )


__all__ = ["CommTransferBackendAdapter"]


class _CommWork:
    __slots__ = ("adapter", "future", "kind", "peer")

    def __init__(self, adapter, future: Future, peer: int, kind: str) -> None:
        self.adapter, self.future, self.peer, self.kind = adapter, future, peer, kind

    def wait(self, timeout_s: float) -> None:
        try:
            self.future.result(timeout=max(float(timeout_s), 0.001))
        except FutureTimeout:
            self.adapter._broken[self.peer] = f"a {self.kind} timed out"
            raise KVTransferTimeoutError(
                f"{self.kind} to/from rank {self.peer} did not complete within {timeout_s:.3f} s",
                peer=self.peer,
            ) from None
        except KVCacheError:
            raise
        except Exception as exc:
            raise KVTransferFailedError(
                f"{self.kind} to/from rank {self.peer} failed: {type(exc).__name__}: {exc}",
                peer=self.peer,
            ) from exc


class CommTransferBackendAdapter(TransferBackend):
    """Adapts an object with ``send``/``recv``/``get_rank`` to the backend interface.

    Args:
        comm_backend: the communication object (not None).
        interconnect: a label of the link (``"rdma"``, ``"tcp"``...), reported
            by ``interconnect`` and in the engine's metrics.
        store: the engine's control store (default: ``comm_backend.store``).
    """

    name = "comm"
    local = False

    def __init__(self, comm_backend: Any, *, interconnect: str = "rdma", store: Any = None) -> None:
        if comm_backend is None:
            raise KVConfigError("comm_backend cannot be None")
        for attr in ("send", "recv", "get_rank"):
            if not callable(getattr(comm_backend, attr, None)):
                raise KVConfigError(f"comm_backend has no callable {attr}()")
        if not isinstance(interconnect, str) or not interconnect:
            raise KVConfigError(f"interconnect must be a non-empty str, got {interconnect!r}")
        self._comm_backend = comm_backend
        self._interconnect = interconnect
        self.rank = self.get_rank()
        ws = self.get_world_size()
        self.world_size = ws if ws > 0 else self.rank + 2  # unknown: at least one peer above
        self.store = store if store is not None else getattr(comm_backend, "store", None)
        self._senders = ThreadPoolExecutor(1, thread_name_prefix="kv-comm-send")
        self._receivers = ThreadPoolExecutor(1, thread_name_prefix="kv-comm-recv")
        self._broken: dict[int, str] = {}

    # -- seed API ----------------------------------------------------------------
    def send(self, tensor: Any, dst_rank: int) -> None:
        _check_peer_args(tensor, dst_rank, "dst_rank")
        self._comm_backend.send(tensor, dst_rank)

    def recv(self, tensor: Any, src_rank: int) -> None:
        _check_peer_args(tensor, src_rank, "src_rank")
        self._comm_backend.recv(tensor, src_rank)

    def get_rank(self) -> int:
        return int(self._comm_backend.get_rank())

    def get_world_size(self) -> int:
        """The comm object's world size, or -1 when it does not say (as the seed)."""
        f = getattr(self._comm_backend, "get_world_size", None)
        return int(f()) if callable(f) else -1

    @property
    def interconnect(self) -> str:
        return self._interconnect

    # -- backend interface ----------------------------------------------------------
    def check_peer(self, peer: int) -> None:
        if isinstance(peer, bool) or not isinstance(peer, int) or peer < 0 or peer == self.rank:
            raise KVTransferFailedError(f"rank {peer!r} is not a peer of rank {self.rank}")
        if peer in self._broken:
            raise KVTransferFailedError(
                f"the link to rank {peer} is unusable ({self._broken[peer]})", peer=peer
            )
        if self.store is None:
            raise KVConfigError(
                "CommTransferBackendAdapter needs a control store for the engine: pass store="
            )

    def expose(self, peer: int, tag: int, tensor: Any) -> _CommWork:
        self.check_peer(peer)
        return _CommWork(self, self._senders.submit(self.send, tensor, peer), peer, "send")

    def fetch(self, peer: int, tag: int, out: Any) -> _CommWork:
        self.check_peer(peer)
        return _CommWork(self, self._receivers.submit(self.recv, out, peer), peer, "recv")

    def close(self) -> None:
        """Stop the workers (a call stuck in the comm object is not waited for)."""
        self._senders.shutdown(wait=False, cancel_futures=True)
        self._receivers.shutdown(wait=False, cancel_futures=True)
        close = getattr(self._comm_backend, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return (
            f"CommTransferBackendAdapter(rank={self.rank}, interconnect={self._interconnect!r}, "
            f"comm={type(self._comm_backend).__name__})"
        )
