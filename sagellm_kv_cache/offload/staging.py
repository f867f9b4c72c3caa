"""Staged bytes between the ops of one copy job, and the small ops that reshape them.

A job's ops share a ``staged`` dict: key -> the bytes of some blocks, either
a tensor ``[L, 2, n, <block dims>]`` (host or device) or a list of per-block
uint8 arrays (disk), where a block whose read failed is ``None``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from typing import Any

from ..errors import KVCacheError, KVStorageError

__all__ = ["Op", "Staged", "staged_as_block_payloads", "staged_as_tensor"]

#: staged bytes of some blocks: a tensor ``[L, 2, n, <block dims>]`` (host/device)
#: or a list of per-block uint8 arrays (disk); ``None`` in metadata-only mode.
Staged = Any
Op = Callable[[dict], None]


def staged_as_tensor(staged: Any, block_dims: tuple[int, ...], storage_dtype: Any):
    """Staged bytes as a ``[L, 2, n, <block dims>]`` tensor in ``storage_dtype``.

    ``block_dims`` is the shape of one block with the block dimension (index 2) of 1.
    """
    import torch

    if isinstance(staged, list):
        parts = [torch.from_numpy(p).view(storage_dtype).reshape(block_dims) for p in staged]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return staged


def staged_as_block_payloads(staged: Any) -> list:
    """Staged bytes as one contiguous payload per block."""
    if isinstance(staged, list):
        return staged
    return [staged[:, :, i].contiguous() for i in range(staged.shape[2])]


def _job(ops: list) -> Any:
    """The job collecting failures when ``ops`` is one (``jobs.Job``)."""
    return ops if hasattr(ops, "failed") else None


def _present(data: Any, n: int) -> list[int]:
    """Indices of the blocks whose bytes are staged in ``data`` (per-block lists may hold None)."""
    if data is None:
        return []
    if isinstance(data, list):
        return [i for i, p in enumerate(data) if p is not None]
    return list(range(n))


def _typed(exc: BaseException, key: Hashable) -> BaseException:
    if isinstance(exc, KVCacheError):
        return exc
    err = KVStorageError(f"block {key!r}: {type(exc).__name__}: {exc}", key=str(key))
    err.__cause__ = exc
    return err


def _not_staged(key: Hashable) -> KVStorageError:
    return KVStorageError(f"block {key!r}: its bytes were not staged (an earlier read failed)")


def _delete_quietly(disk: Any, key: Hashable) -> None:
    """Remove a block file after a failure; a failing delete must not mask it."""
    with contextlib.suppress(KVCacheError):
        disk.delete(key)


def _select_op(src: str, dst: str, index: list[int]) -> Op:
    """An op that stages ``staged[src]`` restricted to blocks ``index`` under ``dst``."""
    idx = list(index)

    def select(staged: dict) -> None:
        data = staged.get(src)
        if data is None:
            return
        if isinstance(data, list):
            staged[dst] = [data[i] for i in idx]
        else:
            import torch

            index = torch.as_tensor(idx, dtype=torch.long, device=data.device)
            staged[dst] = data.index_select(2, index)

    return select


def _concat_key(ops: list, key_a: str, key_b: str | None) -> str:
    if key_b is None:
        return key_a
    out = f"{key_a}+{key_b}"

    def concat(staged: dict) -> None:
        a, b = staged.get(key_a), staged.get(key_b)
        if a is None or b is None:
            return
        if isinstance(a, list) or isinstance(b, list):
            staged[out] = list(staged_as_block_payloads(a)) + list(staged_as_block_payloads(b))
        else:
            import torch

            staged[out] = torch.cat([a, b.to(a.device)], dim=2)

    ops.append(concat)
    return out
