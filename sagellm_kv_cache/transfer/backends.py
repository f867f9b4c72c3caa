"""Transports under ``KVTransferEngine``: one small interface, several backends.

A backend moves opaque byte buffers; the engine owns the protocol (header,
chunks, checksum, ack) and the pools. A backend has:

* ``rank`` / ``world_size`` and a ``store`` (the control plane: a c10d
  ``Store`` with ``set/get/check/wait/compare_set/delete_key``) for
  distributed backends; ``local = True`` for the in-process one;
* ``expose(peer, tag, tensor) -> Work``: make ``tensor`` available to
  ``peer`` under ``tag`` (gloo/NCCL: ``isend``; a one-sided transport such
  as NIXL would register it and publish its descriptor for the peer to READ);
* ``fetch(peer, tag, out) -> Work``: fill ``out`` with what ``peer`` exposed
  under ``tag`` (gloo/NCCL: ``irecv``; one-sided: READ);
* ``Work.wait(timeout_s)``: block at most ``timeout_s``; a dead peer raises
  ``KVTransferFailedError``, a silent one ``KVTransferTimeoutError``.

Every wait takes the caller's remaining time: nothing here ever waits on a
library default (gloo's is 30 minutes).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import KVConfigError, KVTransferFailedError, KVTransferTimeoutError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "InProcessBackend",
    "TorchDistBackend",
    "TransferBackend",
    "Work",
    "make_backend",
]


class Work(Protocol):
    def wait(self, timeout_s: float) -> None: ...


class TransferBackend:
    """Base class; see the module docstring for the contract."""

    name = "base"
    local = False
    rank: int = 0
    world_size: int = 1
    store: Any = None

    def expose(self, peer: int, tag: int, tensor: torch.Tensor) -> Work:  # pragma: no cover
        raise NotImplementedError

    def fetch(self, peer: int, tag: int, out: torch.Tensor) -> Work:  # pragma: no cover
        raise NotImplementedError

    def check_peer(self, peer: int) -> None:
        """Raise ``KVTransferFailedError`` if the link to ``peer`` is known to be unusable."""

    def close(self) -> None:
        """Release transport resources (registrations, groups this backend created)."""


class InProcessBackend(TransferBackend):
    """Moves between pools of one process (CPU -> CPU, CUDA -> host...).

    The engine copies block chunks directly from the source pool's tensor to
    the destination pool's; register both pools with
    ``engine.register_pool(pool, rank)`` and name them by those ranks.
    """

    name = "inprocess"
    local = True


def _default_store():
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception as exc:  # pragma: no cover - depends on how the group was made
        raise KVConfigError(
            "no c10d store found for the default process group; pass store= to the backend"
        ) from exc


class _DistWork:
    """A gloo/NCCL send or recv whose wait is always bounded."""

    __slots__ = ("backend", "kind", "peer", "tensor", "work")

    def __init__(self, backend: TorchDistBackend, peer: int, work: Any, tensor: Any, kind: str):
        self.backend = backend
        self.peer = peer
        self.work = work
        self.tensor = tensor  # kept alive until the transport is done with it
        self.kind = kind

    def wait(self, timeout_s: float) -> None:
        try:
            self.work.wait(timeout=timedelta(seconds=max(timeout_s, 0.001)))
        except RuntimeError as exc:
            msg = str(exc)
            # gloo closes the pair after a timed-out wait; the buffer may still
            # be referenced by the transport, so keep it alive.
            self.backend._mark_broken(self.peer, msg, self)
            if "timed out" in msg.lower() or "timeout" in msg.lower():
                raise KVTransferTimeoutError(
                    f"{self.kind} to/from rank {self.peer} did not complete within "
                    f"{timeout_s:.3f} s",
                    peer=self.peer,
                ) from None
            raise KVTransferFailedError(
                f"{self.kind} to/from rank {self.peer} failed: {msg.splitlines()[0][:300]}",
                peer=self.peer,
            ) from None


class TorchDistBackend(TransferBackend):
    """``torch.distributed`` point-to-point: gloo for CPU tensors, NCCL for CUDA ones.

    The process group must exist (``dist.init_process_group`` or
    ``transfer.launcher``); give it a ``timeout=`` of seconds, not gloo's
    30-minute default, although every wait here passes its own timeout.

    Args:
        store: control-plane store; default: the default group's store.
        group: process group for CPU tensors (default: the default group).
        enable_nccl: create an NCCL group for CUDA tensors now. This is a
            collective (``dist.new_group``): every rank must construct its
            backend with the same value. Not exercised by the CPU test suite.

    After a timed-out or failed wait, gloo has closed the link to that peer;
    later transfers with it raise ``KVTransferFailedError`` at once
    (re-create the process group to recover).
    """

    name = "torch"

    def __init__(self, *, store: Any = None, group: Any = None, enable_nccl: bool = False):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise KVConfigError(
                "the torch backend needs an initialised process group "
                "(dist.init_process_group or sagellm_kv_cache.transfer.launcher)"
            )
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.store = store if store is not None else _default_store()
        self.cpu_backend = str(dist.get_backend(group))
        self._nccl_group = dist.new_group(backend="nccl") if enable_nccl else None
        self._broken: dict[int, str] = {}
        self._abandoned: list[_DistWork] = []

    def _mark_broken(self, peer: int, msg: str, work: _DistWork) -> None:
        self._broken[peer] = msg.splitlines()[0][:300] if msg else "failed"
        self._abandoned.append(work)

    def check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise KVTransferFailedError(
                f"rank {peer} is not a peer of rank {self.rank} (world size {self.world_size})"
            )
        if peer in self._broken:
            raise KVTransferFailedError(
                f"the link to rank {peer} was closed by an earlier failure "
                f"({self._broken[peer]}); re-create the process group",
                peer=peer,
            )

    def _group_for(self, tensor: torch.Tensor) -> Any:
        if tensor.is_cuda:
            if self._nccl_group is not None:
                return self._nccl_group
            if self.cpu_backend != "nccl":
                raise KVConfigError(
                    "CUDA tensors need NCCL: build TorchDistBackend(enable_nccl=True) on every rank"
                )
        elif self.cpu_backend == "nccl":
            raise KVConfigError("an NCCL-only group cannot move CPU tensors; use gloo")
        return self.group

    def _post(self, op, peer: int, tensor: torch.Tensor, tag: int, kind: str) -> _DistWork:
        self.check_peer(peer)
        group = self._group_for(tensor)
        try:
            w = op(tensor, peer, group=group, tag=tag)
        except RuntimeError as exc:  # the link is already closed (peer died, earlier timeout)
            msg = str(exc)
            self._broken[peer] = msg.splitlines()[0][:300]
            raise KVTransferFailedError(
                f"{kind} to/from rank {peer} failed: {msg.splitlines()[0][:300]}", peer=peer
            ) from None
        return _DistWork(self, peer, w, tensor, kind)

    def expose(self, peer: int, tag: int, tensor: torch.Tensor) -> _DistWork:
        return self._post(self._dist.isend, peer, tensor, tag, "send")

    def fetch(self, peer: int, tag: int, out: torch.Tensor) -> _DistWork:
        return self._post(self._dist.irecv, peer, out, tag, "recv")


def make_backend(spec: Any, **options: Any) -> TransferBackend:
    """A backend from a name or an object that already implements the interface.

    Names: ``"torch"`` (also ``"torch.distributed"``, ``"gloo"``, ``"nccl"``),
    ``"inprocess"`` (also ``"local"``), ``"nixl"`` (``nixl_backend.NixlBackend``,
    imported only then), ``"socket"`` (``socket_backend.SocketTransferBackend``,
    started here). ``options`` go to the backend's constructor.
    """
    if spec is None:
        spec = "torch"
    if not isinstance(spec, str):
        if (hasattr(spec, "expose") and hasattr(spec, "fetch")) or getattr(spec, "local", False):
            return spec
        raise KVConfigError(f"comm_backend {spec!r} implements neither expose/fetch nor local")
    name = spec.lower()
    if name in ("torch", "torch.distributed", "gloo", "nccl", "dist"):
        if name == "nccl":
            options.setdefault("enable_nccl", True)
        return TorchDistBackend(**options)
    if name == "nixl":
        from .nixl_backend import NixlBackend  # lazy: nixl_cu12 loads UCX

        return NixlBackend(**options)
    if name in ("socket", "tcp"):
        from .socket_backend import SocketTransferBackend

        return SocketTransferBackend(**options).start()
    if name in ("inprocess", "local", "in-process"):
        if options:
            raise KVConfigError(f"the in-process backend takes no options, got {sorted(options)}")
        return InProcessBackend()
    raise KVConfigError(
        f"unknown comm_backend {spec!r}; use 'torch', 'nixl', 'socket' or 'inprocess'"
    )
