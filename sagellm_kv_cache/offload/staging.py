"""Staged bytes between the steps of one copy plan: the buffer handle and its two shapes.

A ``Buf`` is filled by one step of a plan and read by later ones (``plan.py``).
Its ``data`` is either a tensor ``[L, 2, n, <block dims>]`` (read from a host
or device storage) or a list of per-block uint8 payloads (read from disk),
where a block whose read failed is ``None``; ``None`` as a whole when nothing
was staged (metadata-only, or the read that fills it failed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from typing import Any

from ..errors import KVCacheError, KVStorageError

__all__ = ["Buf", "as_block_payloads", "as_tensor", "block_views", "present_blocks"]


class Buf:
    """A staging buffer handle: one step writes ``data``, later steps of the same plan read it.

    ``label`` only names it in ``repr`` (debugging a plan).
    """

    __slots__ = ("data", "label")

    def __init__(self, label: str = "") -> None:
        self.data: Any = None
        self.label = label

    def __repr__(self) -> str:
        return f"Buf({self.label!r})"


def as_tensor(staged: Any, block_dims: tuple[int, ...], storage_dtype: Any) -> Any:
    """Staged bytes as a ``[L, 2, n, <block dims>]`` tensor in ``storage_dtype``.

    ``block_dims`` is the shape of one block with the block dimension (index 2) of 1.
    """
    import torch

    if isinstance(staged, list):
        parts = [torch.from_numpy(p).view(storage_dtype).reshape(block_dims) for p in staged]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return staged


def as_block_payloads(staged: Any) -> list:
    """Staged bytes as one contiguous payload per block."""
    if isinstance(staged, list):
        return staged
    return [staged[:, :, i].contiguous() for i in range(staged.shape[2])]


def block_views(storage: Any) -> Callable[[int], list[memoryview]]:
    """``b -> `` the writable memory of CPU block ``b`` of ``storage`` as memoryviews: the
    pieces of ``storage.block_buffers(b)``, in its order (layer, then K/V).

    For reads into many blocks (``FilesIn``): each block's pieces are sliced out of one
    memoryview of the whole ``[L, 2, num_blocks, ...]`` tensor, a slice per piece
    instead of a numpy view and then a buffer export per piece.
    """
    kv = storage.kv
    if not kv.is_contiguous():  # pragma: no cover - KVStorage allocates contiguous tensors
        return lambda b: [memoryview(p) for p in storage.block_buffers(b)]
    import torch

    from ..block_pool import check_block_ids

    planes, num_blocks = kv.shape[0] * kv.shape[1], kv.shape[2]
    flat = memoryview(kv.view(torch.uint8).reshape(-1).numpy())
    piece = flat.nbytes // (planes * num_blocks)
    starts = [p * num_blocks * piece for p in range(planes)]

    def views(b: int) -> list[memoryview]:
        (b,) = check_block_ids([b], num_blocks)
        o = b * piece
        return [flat[s + o : s + o + piece] for s in starts]

    return views


def present_blocks(data: Any, n: int) -> list[int]:
    """Indices of the blocks whose bytes are staged in ``data`` (per-block lists may hold None)."""
    if data is None:
        return []
    if isinstance(data, list):
        return [i for i, p in enumerate(data) if p is not None]
    return list(range(n))


def typed_error(exc: BaseException, key: Hashable) -> BaseException:
    """``exc`` as the project's typed error (an ``OSError`` becomes a ``KVStorageError``)."""
    if isinstance(exc, KVCacheError):
        return exc
    err = KVStorageError(f"block {key!r}: {type(exc).__name__}: {exc}", key=str(key))
    err.__cause__ = exc
    return err


def not_staged(key: Hashable) -> KVStorageError:
    return KVStorageError(f"block {key!r}: its bytes were not staged (an earlier read failed)")


def delete_quietly(disk: Any, key: Hashable) -> None:
    """Remove a block file after a failure; a failing delete must not mask it."""
    with contextlib.suppress(KVCacheError):
        disk.delete(key)
