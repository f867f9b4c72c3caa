"""The in-process backend: moves between pools of one process (CPU -> CPU, CUDA -> host...)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from .base import TransferBackend

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["InProcessBackend"]


class InProcessBackend(TransferBackend):
    """Moves between pools of one process.

    The engine copies block pieces directly from the source pool's tensor to
    the destination pool's; register both pools with
    ``engine.register_pool(pool, rank)`` and name them by those ranks. The
    two data-plane calls are the only places bytes cross from one pool to
    the other (a test wraps them to corrupt or stall a move).
    """

    name = "inprocess"
    local = True

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor, index: int) -> None:
        """Copy piece ``index`` of a direct move into the destination blocks.

        Host pieces go through one ``memmove`` on this thread: torch's copy
        splits every piece across its intra-op threads, and on busy cores the
        fork/join per piece costs more than the copy (measured in
        ``bench_transfer.py``: 4 MiB pieces at a fifth of a whole-tensor copy)."""
        nbytes = src.numel() * src.element_size()
        if (
            src.is_cuda
            or dst.is_cuda
            or not (src.is_contiguous() and dst.is_contiguous())
            or dst.numel() * dst.element_size() != nbytes
        ):
            dst.copy_(src)
            return
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)

    def carry(self, chunk: torch.Tensor, device: str, index: int) -> torch.Tensor:
        """Staged chunk ``index`` as it arrives on ``device`` (itself when already there)."""
        return chunk if str(chunk.device) == device else chunk.to(device)
