"""``torch.distributed`` point-to-point backend: gloo for CPU tensors, NCCL for CUDA ones."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ...errors import KVConfigError, KVTransferFailedError, KVTransferTimeoutError
from .base import TransferBackend, default_store

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["TorchDistBackend"]


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
    ``sagellm_kv_cache.testing.launcher``); give it a ``timeout=`` of seconds, not gloo's
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
                "(dist.init_process_group or sagellm_kv_cache.testing.launcher)"
            )
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.store = store if store is not None else default_store()
        self.cpu_backend = str(dist.get_backend(group))
        if self.cpu_backend == "gloo":
            # gloo over TCP pipelines small messages better than large ones: at
            # 1 GiB on loopback, 2 MiB messages beat 16 MiB by ~20% with the
            # checksum on (benchmarks/bench_transfer.py --message-mib)
            self.host_message_bytes = 2 << 20
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
