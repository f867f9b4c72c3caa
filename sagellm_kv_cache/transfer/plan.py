"""What a transfer moves and where: the sender's plan, the tensor layout, the
receiver's freshly allocated blocks, and reusable staging buffers.

A pool's KV is one ``[L, 2, num_blocks, <block dims>]`` tensor. A run of
consecutive blocks of one layer's K or V is one contiguous slab::

    kv[layer, k, a:b]   ->  one flat view, moved with no gather or scatter

so "direct" mode moves such slabs between the pools' own tensors, and
"staged" mode gathers a chunk of blocks into a flat buffer on the sender and
scatters it on the receiver (``gather`` / ``scatter``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import KVConfigError, KVInvalidHandleError, KVInvalidInputError, KVInvalidTypeError
from ..handle import HandleState, KVHandle
from .codec import compress, decompress
from .wire import Segment, TransferHeader

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..pool import KVPool

__all__ = [
    "DIRECT_MAX_MESSAGE_BYTES",
    "DIRECT_MIN_MESSAGE_BYTES",
    "LOCAL_PIECE_BYTES",
    "Plan",
    "Receipt",
    "Staging",
    "as_rows",
    "bytes_of",
    "check_compatible",
    "direct_slices",
    "direct_views",
    "gather",
    "make_plan",
    "num_direct_messages",
    "pool_kv",
    "runs_of",
    "scatter",
]

#: direct mode only when the average message is at least this big: below it,
#: per-message overhead beats the copy it saves
DIRECT_MIN_MESSAGE_BYTES = 64 << 10
#: direct mode cuts each run's per-layer K or V slab into messages of at most
#: this many bytes (one chunk's worth by default): bounded messages keep the
#: receiver hashing close behind the transport and the buffers in flight bounded
DIRECT_MAX_MESSAGE_BYTES = 16 << 20
#: in-process moves copy and hash pieces of at most this size, so both hashes
#: read them from cache right around the copy
LOCAL_PIECE_BYTES = 4 << 20

Run = tuple[int, int, int]


def runs_of(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[Run]:
    """Maximal ``(src_start, dst_start, length)`` runs where both id lists count up by one."""
    runs: list[Run] = []
    if not src_ids:
        return runs
    s0, d0, n = src_ids[0], dst_ids[0], 1
    for s, d in zip(src_ids[1:], dst_ids[1:]):
        if s == s0 + n and d == d0 + n:
            n += 1
        else:
            runs.append((s0, d0, n))
            s0, d0, n = s, d, 1
    runs.append((s0, d0, n))
    return runs


def direct_slices(
    runs: list[Run], num_layers: int, side: int, per_message: int
) -> Iterator[tuple[int, int, int, int]]:
    """``(layer, k, a, b)`` of each message in (run, layer, K/V, piece) order, each
    of at most ``per_message`` blocks; ``side`` 0 takes the source starts, 1 the
    destination starts."""
    for run in runs:
        start, n = run[side], run[2]
        for layer in range(num_layers):
            for k in range(2):
                for a in range(start, start + n, per_message):
                    yield layer, k, a, min(a + per_message, start + n)


def direct_views(kv: Any, runs: list[Run], side: int, per_message: int) -> Iterator[Any]:
    """Contiguous flat views ``kv[layer, k, a:b]`` of ``direct_slices``."""
    for layer, k, a, b in direct_slices(runs, kv.shape[0], side, per_message):
        # flat: torch copies a 1-D view several times faster than the
        # same bytes as a multi-dimensional one
        yield kv[layer, k, a:b].view(-1)


def message_cap(setting: int | None, host_message_bytes: int | None, cuda: bool) -> int:
    """Most bytes per direct-mode message: the engine's ``direct_max_message_bytes``
    when set, else the backend's ``host_message_bytes`` for host KV, else
    ``DIRECT_MAX_MESSAGE_BYTES``."""
    if setting is not None:
        return setting
    return (None if cuda else host_message_bytes) or DIRECT_MAX_MESSAGE_BYTES


def num_direct_messages(runs: list[Run], num_layers: int, per_message: int) -> int:
    return sum(-(-n // per_message) for _, _, n in runs) * 2 * num_layers


def as_rows(kv: Any) -> Any:
    """``[L, 2, n, <block dims>]`` (contiguous) as ``[2L, n, elements per block]``."""
    return kv.view(kv.shape[0] * 2, kv.shape[2], -1)


def pool_kv(pool: KVPool) -> Any:
    """The pool's KV tensor; a metadata-only pool has none to move."""
    storage = pool.storage
    if storage is None:
        raise KVConfigError("a metadata-only pool holds no KV to transfer")
    return storage.kv


def bytes_of(t: torch.Tensor) -> memoryview:
    """The tensor's bytes for hashing (a host copy for CUDA: a documented cost)."""
    import torch

    if t.is_cuda:
        t = t.cpu()
    if t.dtype != torch.uint8:  # numpy has no bfloat16/fp8: hash the raw bytes
        t = t.reshape(-1).view(torch.uint8)
    return memoryview(t.numpy())  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only on Python >= 3.12


@dataclass(slots=True)
class Plan:
    """What the sender moves: where the blocks come from and how they are cut."""

    block_ids: list[int]  # into source kv, in order (empty when data is explicit)
    source: Any  # [L, 2, num_blocks_in_storage, <block dims>] tensor
    header: TransferHeader
    wire_chunks: list[Any] | None = None  # pre-compressed chunks (compression only)
    _hashes: dict[int, Any] | None = None

    def hash_by_block(self) -> dict[int, Any]:
        """Source block id -> its block hash, for the full (cacheable) blocks."""
        if self._hashes is None:
            out: dict[int, Any] = {}
            ids = iter(self.block_ids)
            for seg in self.header.segments:
                for i in range(seg.num_blocks):
                    b = next(ids, None)
                    if b is not None and i < len(seg.block_hashes):
                        out[b] = seg.block_hashes[i]
            self._hashes = out
        return self._hashes


def _segments(handles: Sequence[Any]) -> list[Segment]:
    if not handles:
        raise KVInvalidInputError("nothing to transfer: no handles")
    for h in handles:
        if not isinstance(h, KVHandle):
            raise KVInvalidTypeError(f"expected a KVHandle, got {type(h).__name__}")
        if h.state is HandleState.FREED:
            raise KVInvalidHandleError(f"handle {h.handle_id} was freed")
        if h.num_blocks != -(-h.num_tokens // h.block_size):
            raise KVInvalidInputError(f"handle {h.handle_id} has inconsistent blocks")
    return [
        Segment(h.num_tokens, h.num_blocks, list(h.block_hashes[: h.num_tokens // h.block_size]))
        for h in handles
    ]


def _explicit_source(handles: Sequence[KVHandle], tensors: Sequence[Any]) -> Any:
    import torch

    if len(tensors) != len(handles):
        raise KVInvalidInputError(f"{len(tensors)} tensors for {len(handles)} handles")
    for h, t in zip(handles, tensors):
        if not isinstance(t, torch.Tensor):
            raise KVInvalidTypeError(f"tensor must be a torch.Tensor, got {type(t)}")
        if t.dim() != 6 or t.shape[1] != 2 or t.shape[2] != h.num_blocks:
            raise KVInvalidInputError(
                f"tensor of shape {tuple(t.shape)}; expected [L, 2, {h.num_blocks}, "
                "<block dims>] in the pool's storage layout"
            )
    if len(tensors) == 1:
        return tensors[0].contiguous()
    return torch.cat([t.contiguous() for t in tensors], dim=2)


def make_plan(
    handles: Sequence[KVHandle],
    src: int,
    dst: int,
    pool: KVPool | None,
    tensors: Sequence[Any] | None,
    *,
    chunk_bytes: int,
    checksum_algo: str,
    compression: str,
) -> Plan:
    """Check the handles (and explicit tensors) and cut their blocks into chunks.

    ``pool`` is ``src``'s registered pool (``None``: not registered), read
    when ``tensors`` is None. Raises typed errors before anything moves."""
    import torch

    segments = _segments(handles)
    h0 = handles[0]
    shape = None
    if tensors is None:
        if pool is None:
            raise KVConfigError(f"no pool registered for rank {src}; register_pool() first")
        for h in handles:
            if h.pool_id != pool.pool_id:
                raise KVInvalidHandleError(
                    f"handle {h.handle_id} is not from rank {src}'s registered pool"
                )
        shape = pool.model_shape
        source = pool_kv(pool)
        block_ids = [b for h in handles for b in h.block_ids]
        layout, block_size, dtype = pool.layout, pool.block_size, pool.dtype
    else:
        source = _explicit_source(handles, tensors)
        block_ids = []
        layout, block_size, dtype = h0.layout, h0.block_size, h0.dtype
    if layout == "NHD":
        bs, H, D = source.shape[3], source.shape[4], source.shape[5]
    else:
        H, bs, D = source.shape[3], source.shape[4], source.shape[5]
    if bs != block_size or (shape is not None and (shape.num_kv_heads, shape.head_dim) != (H, D)):
        raise KVInvalidInputError("KV tensor geometry disagrees with the handle's block size")
    num_blocks = sum(s.num_blocks for s in segments)
    bpb = source[:, :, :1].numel() * source.element_size()
    bpc = max(1, min(num_blocks, chunk_bytes // bpb))
    num_chunks = -(-num_blocks // bpc)
    header = TransferHeader(
        transfer_id=0,
        src_rank=src,
        dst_rank=dst,
        block_size=block_size,
        dtype=dtype,
        layout=layout,
        num_layers=source.shape[0],
        num_kv_heads=H,
        head_dim=D,
        segments=segments,
        chunk_nbytes=[(min((c + 1) * bpc, num_blocks) - c * bpc) * bpb for c in range(num_chunks)],
        blocks_per_chunk=bpc,
        checksum_algo=checksum_algo,
        compression=compression,
    )
    header.src_block_ids = list(block_ids) if compression == "none" else []
    if header.bytes_per_block != bpb:
        raise KVInvalidInputError("KV tensor dtype disagrees with the handle's dtype")
    plan = Plan(block_ids, source, header)
    if compression != "none":
        plan.wire_chunks = []
        for c in range(num_chunks):
            raw = gather(plan, c, None).cpu().numpy().tobytes()
            packed = bytearray(compress(compression, raw))
            plan.wire_chunks.append(torch.frombuffer(packed, dtype=torch.uint8))
        header.chunk_nbytes = [w.numel() for w in plan.wire_chunks]
    return plan


def _chunk_view(header: TransferHeader, buf: torch.Tensor, c: int, dtype: Any) -> Any:
    lo, hi = header.chunk_blocks(c)
    n = hi - lo
    if header.layout == "NHD":
        dims = (header.block_size, header.num_kv_heads, header.head_dim)
    else:
        dims = (header.num_kv_heads, header.block_size, header.head_dim)
    return buf[: n * header.bytes_per_block].view(dtype).view(header.num_layers, 2, n, *dims)


def gather(plan: Plan, c: int, buf: torch.Tensor | None) -> torch.Tensor:
    """Chunk ``c`` of the payload, in ``buf`` (flat uint8) when given."""
    import torch

    h = plan.header
    lo, hi = h.chunk_blocks(c)
    src = plan.source
    if buf is None:
        if plan.block_ids:
            idx = torch.as_tensor(plan.block_ids[lo:hi], dtype=torch.long, device=src.device)
            out = src.index_select(2, idx)
        else:
            out = src[:, :, lo:hi].contiguous()
        return out.view(-1).view(torch.uint8)
    # as [2L, blocks, elements per block]: torch gathers and copies 3-D views
    # at memory speed, the 6-D ones several times slower
    rows, src_rows = as_rows(_chunk_view(h, buf, c, src.dtype)), as_rows(src)
    if plan.block_ids:
        idx = torch.as_tensor(plan.block_ids[lo:hi], dtype=torch.long, device=src.device)
        torch.index_select(src_rows, 1, idx, out=rows)
    else:
        rows.copy_(src_rows[:, lo:hi])
    return buf[: (hi - lo) * h.bytes_per_block]


def scatter(
    header: TransferHeader, block_ids: list[int], c: int, wire: torch.Tensor, dst_kv: Any
) -> None:
    """Write chunk ``c`` (wire bytes) into the blocks ``block_ids`` of ``dst_kv``."""
    import torch

    lo, hi = header.chunk_blocks(c)
    if header.compression != "none":
        raw = decompress(header.compression, bytes_of(wire), (hi - lo) * header.bytes_per_block, c)
        wire = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(dst_kv.device)
    rows = as_rows(_chunk_view(header, wire, c, dst_kv.dtype))
    dst_rows = as_rows(dst_kv)
    ids = block_ids[lo:hi]
    runs = runs_of(ids, range(len(ids)))
    if len(runs) * 4 <= len(ids):
        # freshly allocated blocks mostly come in runs: one strided copy per run
        # is ~3x faster than index_copy_
        for d, i, n in runs:
            dst_rows[:, d : d + n].copy_(rows[:, i : i + n])
    else:
        idx = torch.as_tensor(ids, dtype=torch.long, device=dst_kv.device)
        dst_rows.index_copy_(1, idx, rows)


def check_compatible(pool: KVPool, h: TransferHeader) -> None:
    """The sender's KV geometry must be the receiving pool's."""
    s = pool.model_shape
    if s is None:
        raise KVConfigError("a metadata-only pool holds no KV to transfer")
    mine = (pool.block_size, pool.dtype, pool.layout, s.num_layers, s.num_kv_heads, s.head_dim)
    theirs = (h.block_size, h.dtype, h.layout, h.num_layers, h.num_kv_heads, h.head_dim)
    if mine != theirs:
        raise KVConfigError(
            "sender's KV geometry (block_size, dtype, layout, layers, kv_heads, head_dim) "
            f"{theirs} differs from the receiving pool's {mine}"
        )


class Receipt:
    """The receiver's side of one transfer: handles allocated, not yet visible."""

    def __init__(self, pool: KVPool, header: TransferHeader) -> None:
        self.pool = pool
        self.header = header
        self.handles: list[KVHandle] = []
        try:
            for seg in header.segments:
                self.handles.append(pool.alloc(seg.num_tokens))
        except BaseException:
            self.abort()
            raise
        self.block_ids = [b for h in self.handles for b in h.block_ids]

    def abort(self) -> None:
        """Free what was allocated (nothing of it was ever visible)."""
        for h in self.handles:
            if h.state is not HandleState.FREED:
                self.pool.free(h)
        self.handles = []

    def publish(self, keep_handles: bool) -> list[KVHandle]:
        """Cache the blocks under their hashes (visible from now on)."""
        for h, seg in zip(self.handles, self.header.segments):
            if seg.block_hashes:
                self.pool.cache_blocks(h, block_hashes=seg.block_hashes)
        out = list(self.handles)
        if not keep_handles:
            for h in out:
                self.pool.free(h)
        self.handles = []
        return out


class Staging:
    """Reusable flat byte buffers (no per-transfer allocation or page faults)."""

    def __init__(self) -> None:
        self._free: dict[tuple[str, int], list[Any]] = {}
        self._lock = threading.Lock()

    def take(self, device: str, nbytes: int) -> torch.Tensor:
        import torch

        with self._lock:
            lst = self._free.get((device, nbytes))
            if lst:
                return lst.pop()
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def give(self, device: str, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault((device, buf.numel()), []).append(buf)

    @contextlib.contextmanager
    def lease(self, device: str, nbytes: int, count: int) -> Iterator[list[torch.Tensor]]:
        """``count`` buffers of ``nbytes`` for a pipeline of messages in flight,
        given back when the block completes. When it raises they are dropped
        instead: the transport may still read or write the buffer of a message
        that failed or timed out."""
        bufs = [self.take(device, nbytes) for _ in range(count)]
        yield bufs
        for buf in bufs:
            self.give(device, buf)
