"""Transports under ``KVTransferEngine``: one small interface (``base.py``), several backends.

* ``torch_dist.TorchDistBackend``: gloo (CPU) / NCCL (CUDA) point-to-point;
* ``inprocess.InProcessBackend``: two pools of one process;
* ``nixl.NixlBackend``: one-sided READs over UCX (``nixl-cu12``, imported lazily);
* ``socket.SocketTransferBackend``: plain TCP (seed API), with
  ``socket_frames.py`` / ``socket_server.py``;
* ``comm_adapter.CommTransferBackendAdapter``: a seed comm object as a backend.
"""

from __future__ import annotations

from typing import Any

from ...errors import KVConfigError
from .base import AllOf, TransferBackend, Work, default_store
from .inprocess import InProcessBackend
from .torch_dist import TorchDistBackend

__all__ = [
    "AllOf",
    "InProcessBackend",
    "TorchDistBackend",
    "TransferBackend",
    "Work",
    "default_store",
    "make_backend",
]


def make_backend(spec: Any, **options: Any) -> TransferBackend:
    """A backend from a name or an object that already implements the interface.

    Names: ``"torch"`` (also ``"torch.distributed"``, ``"gloo"``, ``"nccl"``),
    ``"inprocess"`` (also ``"local"``), ``"nixl"`` (``nixl.NixlBackend``,
    imported only then), ``"socket"`` (``socket.SocketTransferBackend``,
    started here). ``options`` go to the backend's constructor.
    """
    if spec is None:
        spec = "torch"
    if not isinstance(spec, str):
        if isinstance(spec, TransferBackend):
            return spec
        if hasattr(spec, "expose") and hasattr(spec, "fetch"):
            return _Borrowed(spec)
        raise KVConfigError(
            f"comm_backend {spec!r} is no TransferBackend and implements no expose/fetch"
        )
    name = spec.lower()
    if name in ("torch", "torch.distributed", "gloo", "nccl", "dist"):
        if name == "nccl":
            options.setdefault("enable_nccl", True)
        return TorchDistBackend(**options)
    if name == "nixl":
        from .nixl import NixlBackend  # lazy: nixl_cu12 loads UCX

        return NixlBackend(**options)
    if name in ("socket", "tcp"):
        from .socket import SocketTransferBackend

        return SocketTransferBackend(**options).start()
    if name in ("inprocess", "local", "in-process"):
        if options:
            raise KVConfigError(f"the in-process backend takes no options, got {sorted(options)}")
        return InProcessBackend()
    raise KVConfigError(
        f"unknown comm_backend {spec!r}; use 'torch', 'nixl', 'socket' or 'inprocess'"
    )


class _Borrowed(TransferBackend):
    """An object with only ``expose``/``fetch`` (and optionally ``rank``,
    ``world_size``, ``store``, ``check_peer``, ``close``) as a full backend."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = str(getattr(inner, "name", type(inner).__name__))
        self.rank = getattr(inner, "rank", 0)
        self.world_size = getattr(inner, "world_size", 1)
        self.store = getattr(inner, "store", None)

    def expose(self, peer: int, tag: int, tensor: Any) -> Work:
        return self.inner.expose(peer, tag, tensor)

    def fetch(self, peer: int, tag: int, out: Any) -> Work:
        return self.inner.fetch(peer, tag, out)

    def check_peer(self, peer: int) -> None:
        if hasattr(self.inner, "check_peer"):
            self.inner.check_peer(peer)

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()
