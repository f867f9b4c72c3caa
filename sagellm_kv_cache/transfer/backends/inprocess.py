"""The in-process backend: moves between pools of one process (CPU -> CPU, CUDA -> host...)."""

from __future__ import annotations

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
        """Copy piece ``index`` of a direct move into the destination blocks."""
        dst.copy_(src)

    def carry(self, chunk: torch.Tensor, device: str, index: int) -> torch.Tensor:
        """Staged chunk ``index`` as it arrives on ``device`` (itself when already there)."""
        return chunk if str(chunk.device) == device else chunk.to(device)
