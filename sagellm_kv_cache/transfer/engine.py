"""``KVTransferEngine`` (seed API): move the KV blocks of handles between pools.

::

    sender (rank s)                                   receiver (rank d)
    transfer_kv_handle(handle, s, d)                  receive(pool) / serve(pool)
      header  --- store: hdr ------------------------->  validate, alloc within budget
              <-- store: ready (OK | error code) -----   (nothing visible yet)
      chunk 0 --- backend.expose / fetch ------------->  checksum += chunk; scatter
      chunk 1 ... (max_inflight chunks in flight)        into the new blocks
      trailer --- store: trl (checksum) -------------->  compare checksums
              <-- store: ack (OK | error code) -------   OK: register block hashes in
                                                           the prefix cache (visible now)

All or nothing: the receiver writes into blocks of handles it just allocated
and has not cached, so nothing is visible until the ack is agreed; on any
failure it frees them. Sender and receiver agree on the outcome with an
atomic ``compare_set`` on the ready and ack keys: a side that gives up
(timeout) writes ``CANCELLED`` there first, and the other side sees it.

Receiver semantics: ``receive()`` returns the live handles (the caller
frees them; their full blocks are already cached); ``serve()`` frees each
transfer's handles right after caching, so the blocks stay cached and
evictable and a later request with the same prefix hits them.

The receiver applies its own policy (``guard.py``): a checksum when it has
``enable_checksum``, every message's length, bounded decompression. Whatever
fails on its side, it writes the verdict (error code) where the sender waits,
ready or ack, after consuming the rest of the stream, so errors reach the
sender typed and at once: ``KVTransferTimeoutError`` (a wait ran past
``timeout_s``), ``KVChecksumMismatchError`` (the receiver's checksum
differed), ``KVTransferFailedError`` (anything else: dead peer, receiver
budget, bad header, short message), each with ``details["remote_code"]`` when
the receiver named the cause. Checksum mismatches and receiver budget failures are
retried up to ``max_retries`` times with exponential backoff; timeouts are
not (gloo closes the link after one).
"""

from __future__ import annotations

import enum
import itertools
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..errors import (
    KVBudgetExceededError,
    KVCacheError,
    KVChecksumMismatchError,
    KVConfigError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from ..handle import HandleState, KVHandle
from ._args import check_count, check_handles, check_number, check_pool, check_rank
from .backends import TransferBackend, make_backend
from .guard import TailGuard, check_policy, inflate, verdict
from .seed_api import TransferSeedMixin
from .wire import (
    Checksum,
    Segment,
    TransferHeader,
    decode_header,
    decode_trailer,
    encode_header,
    encode_trailer,
    make_checksum,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..pool import KVPool

__all__ = ["KVTransferEngine", "ReceivedTransfer", "TransferRecord", "TransferStatus"]

_OK = b"OK"
_CANCELLED = b"CANCELLED"
_KEY_ROOT = "skvx"


class TransferStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(slots=True)
class TransferRecord:
    """Metadata and metrics of one transfer (one side's view)."""

    transfer_id: int
    src_rank: int
    dst_rank: int
    role: str  # "sender", "receiver" or "local"
    status: TransferStatus = TransferStatus.PENDING
    num_segments: int = 0
    num_blocks: int = 0
    num_tokens: int = 0
    payload_nbytes: int = 0
    wire_nbytes: int = 0
    duration_s: float = 0.0
    retries: int = 0
    checksum_algo: str = "none"
    compression: str = "none"
    error_code: str | None = None
    error: str | None = None
    dst_handle_ids: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    @property
    def gbps(self) -> float:
        """Payload gigabytes (1e9 bytes) per second of the whole transfer."""
        return self.payload_nbytes / self.duration_s / 1e9 if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "transfer_id": self.transfer_id,
            "src_rank": self.src_rank,
            "dst_rank": self.dst_rank,
            "role": self.role,
            "status": self.status.value,
            "num_segments": self.num_segments,
            "num_blocks": self.num_blocks,
            "num_tokens": self.num_tokens,
            "payload_nbytes": self.payload_nbytes,
            "wire_nbytes": self.wire_nbytes,
            "duration_s": self.duration_s,
            "gbps": self.gbps,
            "retries": self.retries,
            "checksum_algo": self.checksum_algo,
            "compression": self.compression,
            "error_code": self.error_code,
            "error": self.error,
            "dst_handle_ids": list(self.dst_handle_ids),
            "started_at": self.started_at,
        }


@dataclass(slots=True)
class ReceivedTransfer:
    """What ``receive()`` returns: the record and the receiver's handles (one per segment)."""

    record: TransferRecord
    handles: list[KVHandle]

    @property
    def handle(self) -> KVHandle:
        """The only handle of a single-handle transfer."""
        if len(self.handles) != 1:
            raise KVInvalidInputError(f"transfer has {len(self.handles)} handles; use .handles")
        return self.handles[0]

    @property
    def transfer_id(self) -> int:
        return self.record.transfer_id


class _Keys:
    """Control-plane keys of one transfer from ``src`` to ``dst``."""

    __slots__ = ("ack", "hdr", "ready", "trl")

    def __init__(self, src: int, dst: int, seq: int) -> None:
        base = f"{_KEY_ROOT}/{dst}/{src}/{seq}"
        self.hdr = f"{base}/hdr"
        self.ready = f"{base}/ready"
        self.trl = f"{base}/trl"
        self.ack = f"{base}/ack"


def _tag(seq: int, chunk: int) -> int:
    # unique per (pair, transfer, chunk) while fewer than 32768 transfers of one
    # pair are in flight; gloo tags are int32
    return ((seq & 0x7FFF) << 16) | (chunk & 0xFFFF)


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
MODE_STAGED, MODE_DIRECT = 0, 1
_READY_DIRECT = struct.Struct("<BI")  # mode, blocks per message


def _runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal ``(src_start, dst_start, length)`` runs where both id lists count up by one."""
    runs: list[tuple[int, int, int]] = []
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


def _direct_views(kv, runs: list[tuple[int, int, int]], side: int, per_message: int):
    """Contiguous flat views of ``kv[l, k, a:b]`` in (run, layer, K/V, piece) order,
    each of at most ``per_message`` blocks.

    ``side`` 0 takes the source starts, 1 the destination starts. In the pool's
    ``[L, 2, num_blocks, ...]`` tensor a run of consecutive blocks of one layer's
    K or V is one contiguous slab, so it moves with no gather or scatter."""
    L = kv.shape[0]
    for run in runs:
        start, n = run[side], run[2]
        for layer in range(L):
            for k in range(2):
                for a in range(start, start + n, per_message):
                    # flat: torch copies a 1-D view several times faster than the
                    # same bytes as a multi-dimensional one
                    yield kv[layer, k, a : min(a + per_message, start + n)].view(-1)


def _as_rows(kv):
    """``[L, 2, n, <block dims>]`` (contiguous) as ``[2L, n, elements per block]``."""
    return kv.view(kv.shape[0] * 2, kv.shape[2], -1)


def _num_direct_messages(
    runs: list[tuple[int, int, int]], num_layers: int, per_message: int
) -> int:
    return sum(-(-n // per_message) for _, _, n in runs) * 2 * num_layers


def _encode_status(code: str, message: str = "") -> bytes:
    return f"{code}:{message[:500]}".encode()


def _decode_status(raw: bytes) -> tuple[str, str]:
    text = bytes(raw).decode("utf-8", "replace")
    code, _, msg = text.partition(":")
    return code, msg


def _remote_error(raw: bytes, what: str, record: TransferRecord) -> KVTransferFailedError:
    code, msg = _decode_status(raw)
    if code == "CANCELLED":
        return KVTransferFailedError(f"{what}: the receiver cancelled", remote_code=code)
    cls = KVChecksumMismatchError if code == KVChecksumMismatchError.code else None
    if code == KVTransferTimeoutError.code:
        cls = KVTransferTimeoutError
    cls = cls or KVTransferFailedError
    return cls(
        f"{what} (transfer {record.transfer_id} to rank {record.dst_rank}): [{code}] {msg}",
        remote_code=code,
    )


@dataclass(slots=True)
class _Plan:
    """What the sender moves: where the blocks come from and how they are cut."""

    segments: list[Segment]
    block_ids: list[int]  # into source kv, in order (empty when data is explicit)
    source: Any  # [L, 2, num_blocks_in_storage, <block dims>] tensor
    header: TransferHeader
    wire_chunks: list[Any] | None = None  # pre-compressed chunks (compression only)


class _Receipt:
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
        for h in self.handles:
            if h.state is not HandleState.FREED:
                self.pool.free(h)
        self.handles = []

    def publish(self, keep_handles: bool) -> list[KVHandle]:
        for h, seg in zip(self.handles, self.header.segments):
            if seg.block_hashes:
                self.pool.cache_blocks(h, block_hashes=seg.block_hashes)
        out = list(self.handles)
        if not keep_handles:
            for h in out:
                self.pool.free(h)
        self.handles = []
        return out


class _Staging:
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


def _check_time(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise KVTransferTimeoutError(f"{what}: timed out")
    return left


class KVTransferEngine(TransferSeedMixin):
    """Moves the KV blocks of handles from one pool to another, all or nothing.

    Args:
        comm_backend: ``"torch"`` (default; gloo for CPU tensors, NCCL for CUDA
            ones), ``"nixl"`` (one-sided READs over UCX, ``nixl_backend.py``),
            ``"inprocess"`` (two pools of one process), or a backend object
            implementing ``expose``/``fetch`` (``backends.py``).
        enable_checksum: checksum the payload (xxh3_64, crc32 without xxhash)
            and verify it on the receiver before anything becomes visible; as
            a receiver, refuse transfers that carry no checksum.
        max_retries: extra attempts after a checksum mismatch or a receiver
            that had no room (not after timeouts or dead peers).
        retry_backoff_ms: first backoff; doubles per retry.
        timeout_s: bound on every wait of one attempt (ready, each chunk, ack).
        compression: ``None`` or ``"zlib"`` (level 1; see benchmarks: it costs
            far more CPU than it saves on fp16 KV).
        chunk_bytes: payload chunk size; chunks are pipelined.
        max_inflight: chunks in flight at once per transfer.
        max_workers: threads behind ``transfer_kv_handle_async``.
        direct_min_message_bytes: the receiver picks zero-copy "direct" mode
            (one message per run of consecutive blocks per layer and K/V, read
            from and written into the pools' tensors) when the average message
            is at least this big; otherwise "staged" mode (gather into chunks,
            scatter on arrival).
        direct_max_message_bytes: the receiver cuts direct-mode slabs into
            messages of at most this size (see ``DIRECT_MAX_MESSAGE_BYTES``).
        **backend_options: passed to the backend (``store=``, ``enable_nccl=``...).
    """

    def __init__(
        self,
        comm_backend: Any = "torch",
        *,
        enable_checksum: bool = True,
        max_retries: int = 2,
        retry_backoff_ms: float = 50.0,
        timeout_s: float = 30.0,
        compression: str | None = None,
        chunk_bytes: int = 16 << 20,
        max_inflight: int = 4,
        max_workers: int = 4,
        direct_min_message_bytes: int = DIRECT_MIN_MESSAGE_BYTES,
        direct_max_message_bytes: int = DIRECT_MAX_MESSAGE_BYTES,
        **backend_options: Any,
    ) -> None:
        check_number("timeout_s", timeout_s, strict=True)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise KVConfigError(f"max_retries must be an int >= 0, got {max_retries!r}")
        check_number("retry_backoff_ms", retry_backoff_ms)
        if compression not in (None, "none", "zlib"):
            raise KVConfigError(f"compression must be None or 'zlib', got {compression!r}")
        for name in ("chunk_bytes", "max_inflight", "max_workers", "direct_max_message_bytes"):
            check_count(name, locals()[name])
        check_number("direct_min_message_bytes", direct_min_message_bytes)
        self.backend: TransferBackend = make_backend(comm_backend, **backend_options)
        self.enable_checksum = bool(enable_checksum)
        self.checksum_algo = make_checksum(self.enable_checksum)
        self.max_retries = max_retries
        self.retry_backoff_ms = float(retry_backoff_ms)
        self.timeout_s = float(timeout_s)
        self.compression = "zlib" if compression == "zlib" else "none"
        self.chunk_bytes = int(chunk_bytes)
        self.max_inflight = int(max_inflight)
        self.max_workers = int(max_workers)
        self.direct_min_message_bytes = int(direct_min_message_bytes)
        self.direct_max_message_bytes = int(direct_max_message_bytes)
        self._pools: dict[int, KVPool] = {}
        self._records: dict[int, TransferRecord] = {}
        self._lock = threading.Lock()
        self._pair_locks: dict[tuple[int, int], threading.Lock] = {}
        self._send_seq: dict[int, int] = {}
        self._recv_seq: dict[int, int] = {}
        self._recv_lock = threading.Lock()
        self._local_ids = itertools.count(1)
        self._executor: ThreadPoolExecutor | None = None
        self._staging = _Staging()
        self._totals = {"completed": 0, "failed": 0, "bytes": 0, "seconds": 0.0, "retries": 0}
        #: test instrumentation: called as ``hook(stage, **info)`` at "header",
        #: "ready", "chunk_sent" (sender, with ``chunk``), "chunk_received",
        #: "before_ack" (receiver) and "local_chunk" (in-process, with ``chunk``).
        self._fault_hook = None

    # -- pools ---------------------------------------------------------------
    @property
    def rank(self) -> int | None:
        return None if self.backend.local else self.backend.rank

    def register_pool(self, pool: KVPool, rank: int | None = None) -> None:
        """Make ``pool`` this engine's pool for ``rank`` (default: the backend's rank)."""
        check_pool(pool)
        if rank is None:
            if self.backend.local:
                raise KVConfigError("the in-process backend needs an explicit rank per pool")
            rank = self.backend.rank
        check_rank("rank", rank)
        if pool.storage is None:
            raise KVConfigError("a metadata-only pool holds no KV to transfer")
        with self._lock:
            self._pools[rank] = pool

    def _pool_for(self, rank: int) -> KVPool:
        try:
            return self._pools[rank]
        except KeyError:
            raise KVConfigError(f"no pool registered for rank {rank}") from None

    # -- bookkeeping ---------------------------------------------------------
    def _new_record(self, src: int, dst: int, role: str, tid: int) -> TransferRecord:
        rec = TransferRecord(
            transfer_id=tid,
            src_rank=src,
            dst_rank=dst,
            role=role,
            status=TransferStatus.RUNNING,
            checksum_algo=self.checksum_algo,
            compression=self.compression,
        )
        with self._lock:
            self._records[tid] = rec
        return rec

    def _finish(self, rec: TransferRecord, t0: float, exc: BaseException | None) -> None:
        rec.duration_s = time.perf_counter() - t0
        with self._lock:
            if exc is None:
                rec.status = TransferStatus.COMPLETED
                self._totals["completed"] += 1
                self._totals["bytes"] += rec.payload_nbytes
                self._totals["seconds"] += rec.duration_s
            else:
                rec.status = TransferStatus.FAILED
                rec.error_code = getattr(exc, "code", type(exc).__name__)
                rec.error = str(exc)
                self._totals["failed"] += 1
            self._totals["retries"] += rec.retries

    def get_transfer_status(self, transfer_id: int) -> TransferStatus:
        return self._record(transfer_id).status

    def get_transfer_metadata(self, transfer_id: int) -> dict[str, Any]:
        """The transfer's record as a dict (bytes, duration, GB/s, retries, error...)."""
        return self._record(transfer_id).to_dict()

    def _record(self, transfer_id: int) -> TransferRecord:
        with self._lock:
            try:
                return self._records[transfer_id]
            except KeyError:
                raise KVInvalidInputError(f"unknown transfer id {transfer_id}") from None

    def get_metrics(self) -> dict[str, Any]:
        """Totals over this engine's transfers (both roles)."""
        with self._lock:
            t = dict(self._totals)
        t["gbps"] = t["bytes"] / t["seconds"] / 1e9 if t["seconds"] else 0.0
        t["backend"] = self.backend.name
        return t

    # -- planning --------------------------------------------------------------
    def _plan(
        self, handles: Sequence[KVHandle], src: int, dst: int, tensors: Sequence[Any] | None
    ) -> _Plan:
        import torch

        if not handles:
            raise KVInvalidInputError("nothing to transfer: no handles")
        for h in handles:
            if not isinstance(h, KVHandle):
                raise KVInvalidTypeError(f"expected a KVHandle, got {type(h).__name__}")
            if h.state is HandleState.FREED:
                raise KVInvalidHandleError(f"handle {h.handle_id} was freed")
        segments = [
            Segment(
                h.num_tokens, h.num_blocks, list(h.block_hashes[: h.num_tokens // h.block_size])
            )
            for h in handles
        ]
        for h, s in zip(handles, segments):
            if s.num_blocks != -(-h.num_tokens // h.block_size):
                raise KVInvalidInputError(f"handle {h.handle_id} has inconsistent blocks")
        h0 = handles[0]
        if tensors is None:
            pool = self._pools.get(src)
            if pool is None:
                raise KVConfigError(f"no pool registered for rank {src}; register_pool() first")
            for h in handles:
                if h.pool_id != pool.pool_id:
                    raise KVInvalidHandleError(
                        f"handle {h.handle_id} is not from rank {src}'s registered pool"
                    )
            shape = pool.model_shape
            source = pool.storage.kv
            block_ids = [b for h in handles for b in h.block_ids]
            layout, block_size, dtype = pool.layout, pool.block_size, pool.dtype
        else:
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
            source = (
                torch.cat([t.contiguous() for t in tensors], dim=2)
                if len(tensors) > 1
                else (tensors[0].contiguous())
            )
            block_ids = []
            layout, block_size, dtype = h0.layout, h0.block_size, h0.dtype
            shape = None
        L = source.shape[0]
        if layout == "NHD":
            bs, H, D = source.shape[3], source.shape[4], source.shape[5]
        else:
            H, bs, D = source.shape[3], source.shape[4], source.shape[5]
        if bs != block_size or (
            shape is not None and (shape.num_kv_heads, shape.head_dim) != (H, D)
        ):
            raise KVInvalidInputError("KV tensor geometry disagrees with the handle's block size")
        num_blocks = sum(s.num_blocks for s in segments)
        bpb = source[:, :, :1].numel() * source.element_size()
        bpc = max(1, min(num_blocks, self.chunk_bytes // bpb))
        num_chunks = -(-num_blocks // bpc)
        chunk_nbytes = [(min((c + 1) * bpc, num_blocks) - c * bpc) * bpb for c in range(num_chunks)]
        header = TransferHeader(
            transfer_id=0,
            src_rank=src,
            dst_rank=dst,
            block_size=block_size,
            dtype=dtype,
            layout=layout,
            num_layers=L,
            num_kv_heads=H,
            head_dim=D,
            segments=segments,
            chunk_nbytes=chunk_nbytes,
            blocks_per_chunk=bpc,
            checksum_algo=self.checksum_algo,
            compression=self.compression,
        )
        header.src_block_ids = list(block_ids) if self.compression == "none" else []
        if header.bytes_per_block != bpb:
            raise KVInvalidInputError("KV tensor dtype disagrees with the handle's dtype")
        plan = _Plan(segments, block_ids, source, header)
        if self.compression == "zlib":
            plan.wire_chunks = []
            for c in range(num_chunks):
                raw = self._gather(plan, c, None).cpu().numpy().tobytes()
                wire = torch.frombuffer(bytearray(zlib.compress(raw, 1)), dtype=torch.uint8)
                plan.wire_chunks.append(wire)
            header.chunk_nbytes = [w.numel() for w in plan.wire_chunks]
        return plan

    def _chunk_view(self, header: TransferHeader, buf: torch.Tensor, c: int, dtype) -> Any:
        lo, hi = header.chunk_blocks(c)
        n = hi - lo
        nbytes = n * header.bytes_per_block
        if header.layout == "NHD":
            dims = (header.block_size, header.num_kv_heads, header.head_dim)
        else:
            dims = (header.num_kv_heads, header.block_size, header.head_dim)
        return buf[:nbytes].view(dtype).view(header.num_layers, 2, n, *dims)

    def _gather(self, plan: _Plan, c: int, buf: torch.Tensor | None) -> torch.Tensor:
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
        view = self._chunk_view(h, buf, c, src.dtype)
        # as [2L, blocks, elements per block]: torch gathers and copies 3-D views
        # at memory speed, the 6-D ones several times slower
        rows, src_rows = _as_rows(view), _as_rows(src)
        if plan.block_ids:
            idx = torch.as_tensor(plan.block_ids[lo:hi], dtype=torch.long, device=src.device)
            torch.index_select(src_rows, 1, idx, out=rows)
        else:
            rows.copy_(src_rows[:, lo:hi])
        return buf[: (hi - lo) * h.bytes_per_block]

    @staticmethod
    def _bytes_of(t: torch.Tensor):
        import torch

        if t.is_cuda:  # the checksum runs on host bytes (a copy: documented cost)
            t = t.cpu()
        if t.dtype != torch.uint8:  # numpy has no bfloat16/fp8: hash the raw bytes
            t = t.reshape(-1).view(torch.uint8)
        return memoryview(t.numpy())

    # -- sender API ------------------------------------------------------------
    def transfer_kv_handle(
        self, handle: KVHandle, src_rank: int, dst_rank: int, tensor: Any = None
    ) -> int:
        """Send ``handle``'s blocks from ``src_rank``'s pool to ``dst_rank``'s; block
        until the receiver acknowledged. Returns the transfer id.

        Args:
            handle: a live handle of the pool registered for ``src_rank``.
            src_rank: this process's rank (distributed backends) or a registered pool's rank.
            dst_rank: the receiving rank.
            tensor: the blocks' KV as ``[L, 2, num_blocks, <block dims>]`` instead
                of reading them from a registered pool.

        Raises:
            KVTransferTimeoutError / KVChecksumMismatchError / KVTransferFailedError.
        """
        return self.transfer_kv_handles(
            [handle], src_rank, dst_rank, tensors=None if tensor is None else [tensor]
        )

    def transfer_kv_handles(
        self,
        handles: Sequence[KVHandle],
        src_rank: int,
        dst_rank: int,
        tensors: Sequence[Any] | None = None,
    ) -> int:
        """Batched form: the blocks of all ``handles`` in one transfer (one header,
        one pipelined payload, one ack); the receiver gets one handle per input
        handle, all or none. Returns the transfer id."""
        handles = check_handles(handles)
        check_rank("src_rank", src_rank)
        check_rank("dst_rank", dst_rank)
        plan = self._plan(handles, src_rank, dst_rank, tensors)
        if self.backend.local:
            self._pool_for(dst_rank)  # before a record exists: a bad rank changes nothing
            return self._transfer_local(plan, src_rank, dst_rank)
        if src_rank != self.backend.rank:
            raise KVInvalidInputError(
                f"src_rank={src_rank} but this process is rank {self.backend.rank}"
            )
        self.backend.check_peer(dst_rank)
        return self._transfer_remote(plan, src_rank, dst_rank)

    def transfer_kv_handle_async(
        self, handle: KVHandle, src_rank: int, dst_rank: int, tensor: Any = None
    ) -> Future:
        """``transfer_kv_handle`` on a worker thread; the future's result is the transfer id."""
        return self._pool_executor().submit(
            self.transfer_kv_handle, handle, src_rank, dst_rank, tensor
        )

    def transfer_kv_handles_async(
        self, handles: Sequence[KVHandle], src_rank: int, dst_rank: int
    ) -> Future:
        return self._pool_executor().submit(self.transfer_kv_handles, handles, src_rank, dst_rank)

    def _pool_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="kvx")
            return self._executor

    def _retry_sleep(self, attempt: int) -> None:
        time.sleep(self.retry_backoff_ms * (2**attempt) / 1000.0)

    def _retryable(self, exc: KVCacheError) -> bool:
        code = exc.details.get("remote_code") if isinstance(exc, KVCacheError) else None
        return isinstance(exc, KVChecksumMismatchError) or code in (
            KVBudgetExceededError.code,
            "KV_POOL_FULL",
        )

    # -- in-process path -------------------------------------------------------
    def _transfer_local(self, plan: _Plan, src: int, dst: int) -> int:
        tid = next(self._local_ids)
        plan.header.transfer_id = tid
        rec = self._new_record(src, dst, "local", tid)
        self._fill_record(rec, plan.header)
        t0 = time.perf_counter()
        exc: BaseException | None = None
        try:
            dst_pool = self._pool_for(dst)
            header = decode_header(encode_header(plan.header))  # same validation as the wire
            self._check_compatible(dst_pool, header)
            for attempt in range(self.max_retries + 1):
                try:
                    handles = self._local_once(plan, header, dst_pool)
                    rec.dst_handle_ids = [h.handle_id for h in handles]
                    break
                except (KVChecksumMismatchError, KVBudgetExceededError) as e:
                    if attempt == self.max_retries:
                        if isinstance(e, KVBudgetExceededError):
                            raise KVTransferFailedError(
                                f"rank {dst} has no room: {e.message}", remote_code=e.code
                            ) from e
                        raise
                    rec.retries += 1
                    self._retry_sleep(attempt)
        except BaseException as e:
            exc = e
            raise
        finally:
            self._finish(rec, t0, exc)
        return tid

    def _local_once(self, plan: _Plan, header: TransferHeader, dst_pool: KVPool) -> list[KVHandle]:
        receipt = _Receipt(dst_pool, header)
        try:
            dst_kv = dst_pool.storage.kv
            pieces = self._local_direct_pieces(plan, header, receipt, dst_kv)
            if pieces is not None:
                self._local_direct(header, pieces)
                return receipt.publish(keep_handles=False)
            src_dev = str(plan.source.device)
            dst_dev = str(dst_kv.device)
            send_sum, recv_sum = Checksum(header.checksum_algo), Checksum(header.checksum_algo)
            cap = header.blocks_per_chunk * header.bytes_per_block
            buf = self._staging.take(src_dev, cap)
            try:
                for c in range(header.num_chunks):
                    wire = (
                        plan.wire_chunks[c]
                        if plan.wire_chunks is not None
                        else self._gather(plan, c, buf)
                    )
                    if header.checksum_algo != "none":
                        send_sum.update(self._bytes_of(wire))
                    if self._fault_hook:
                        self._fault_hook("local_chunk", chunk=wire, index=c)
                    moved = wire.to(dst_dev, non_blocking=False) if src_dev != dst_dev else wire
                    if header.checksum_algo != "none":
                        recv_sum.update(self._bytes_of(moved))
                    self._scatter(header, receipt, c, moved, dst_kv)
            finally:
                self._staging.give(src_dev, buf)
            if send_sum.value() != recv_sum.value():
                raise KVChecksumMismatchError(
                    f"transfer {header.transfer_id}: checksum {recv_sum.value():#x} of the "
                    f"copied bytes differs from the source's {send_sum.value():#x}"
                )
            return receipt.publish(keep_handles=False)
        except BaseException:
            receipt.abort()
            raise

    def _local_direct_pieces(self, plan: _Plan, header: TransferHeader, receipt: _Receipt, dst_kv):
        """Pairs of (source, destination) views for a one-copy CPU -> CPU move, or None
        (compression, explicit tensors, CUDA, or runs too short to beat staging)."""
        src = plan.source
        if plan.wire_chunks is not None or not plan.block_ids or src.is_cuda or dst_kv.is_cuda:
            return None
        runs = _runs(plan.block_ids, receipt.block_ids)
        slab_bytes = header.bytes_per_block // (2 * header.num_layers)
        per_piece = max(1, LOCAL_PIECE_BYTES // max(slab_bytes, 1))
        n = _num_direct_messages(runs, header.num_layers, per_piece)
        if header.payload_nbytes / n < self.direct_min_message_bytes:
            return None
        return zip(
            _direct_views(src, runs, 0, per_piece), _direct_views(dst_kv, runs, 1, per_piece)
        )

    def _local_direct(self, header: TransferHeader, pieces) -> None:
        """Copy each piece straight into the destination blocks; hash the source
        piece before and the destination piece right after the copy, while both
        are still in cache."""
        import torch

        check = header.checksum_algo != "none"
        send_sum, recv_sum = Checksum(header.checksum_algo), Checksum(header.checksum_algo)
        for m, (s, d) in enumerate(pieces):
            if check:
                send_sum.update(self._bytes_of(s))
            d.copy_(s)
            if self._fault_hook:
                self._fault_hook("local_chunk", chunk=d.reshape(-1).view(torch.uint8), index=m)
            if check:
                recv_sum.update(self._bytes_of(d))
        if send_sum.value() != recv_sum.value():
            raise KVChecksumMismatchError(
                f"transfer {header.transfer_id}: checksum {recv_sum.value():#x} of the "
                f"copied bytes differs from the source's {send_sum.value():#x}"
            )

    def _scatter(
        self, header: TransferHeader, receipt: _Receipt, c: int, wire: torch.Tensor, dst_kv
    ) -> None:
        import torch

        lo, hi = header.chunk_blocks(c)
        if header.compression == "zlib":
            raw = inflate(self._bytes_of(wire), (hi - lo) * header.bytes_per_block, c)
            wire = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(dst_kv.device)
        rows = _as_rows(self._chunk_view(header, wire, c, dst_kv.dtype))
        dst_rows = _as_rows(dst_kv)
        ids = receipt.block_ids[lo:hi]
        runs = _runs(ids, range(len(ids)))
        if len(runs) * 4 <= len(ids):
            # freshly allocated blocks mostly come in runs: one strided copy per run
            # is ~3x faster than index_copy_
            for d, i, n in runs:
                dst_rows[:, d : d + n].copy_(rows[:, i : i + n])
        else:
            idx = torch.as_tensor(ids, dtype=torch.long, device=dst_kv.device)
            dst_rows.index_copy_(1, idx, rows)

    @staticmethod
    def _check_compatible(pool: KVPool, h: TransferHeader) -> None:
        s = pool.model_shape
        mine = (pool.block_size, pool.dtype, pool.layout, s.num_layers, s.num_kv_heads, s.head_dim)
        theirs = (h.block_size, h.dtype, h.layout, h.num_layers, h.num_kv_heads, h.head_dim)
        if mine != theirs:
            raise KVConfigError(
                "sender's KV geometry (block_size, dtype, layout, layers, kv_heads, head_dim) "
                f"{theirs} differs from the receiving pool's {mine}"
            )

    @staticmethod
    def _fill_record(rec: TransferRecord, h: TransferHeader) -> None:
        rec.num_segments = len(h.segments)
        rec.num_blocks = h.num_blocks
        rec.num_tokens = h.num_tokens
        rec.payload_nbytes = h.payload_nbytes
        rec.wire_nbytes = h.wire_nbytes
        rec.checksum_algo = h.checksum_algo
        rec.compression = h.compression

    # -- distributed sender ----------------------------------------------------
    def _pair_lock(self, src: int, dst: int) -> threading.Lock:
        with self._lock:
            return self._pair_locks.setdefault((src, dst), threading.Lock())

    def _store_wait(self, key: str, deadline: float, what: str) -> bytes | None:
        """The value of ``key`` once set, or None when ``deadline`` passes first."""
        store = self.backend.store
        left = deadline - time.monotonic()
        if left > 0:
            try:
                store.wait([key], timedelta(seconds=left))
            except Exception as exc:  # DistStoreError on timeout; others: store gone
                if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                    raise KVTransferFailedError(f"{what}: control store failed: {exc}") from None
                return None
            return store.get(key)
        return store.get(key) if store.check([key]) else None

    def _settle(self, key: str, deadline: float, what: str) -> bytes:
        """Wait for the peer's verdict under ``key``; at the deadline, claim it as
        CANCELLED atomically. Returns whichever value won."""
        value = self._store_wait(key, deadline, what)
        if value is None:
            value = self.backend.store.compare_set(key, b"", _CANCELLED)
        return bytes(value)

    def _transfer_remote(self, plan: _Plan, src: int, dst: int) -> int:
        retries = 0
        for attempt in range(self.max_retries + 1):
            holder: list[TransferRecord] = []
            t0 = time.perf_counter()
            try:
                tid = self._send_once(plan, src, dst, holder)
            except BaseException as exc:
                if holder:
                    holder[0].retries = retries
                    self._finish(holder[0], t0, exc)
                retry = (
                    attempt < self.max_retries
                    and isinstance(exc, KVTransferFailedError)
                    and self._retryable(exc)
                )
                if not retry:
                    raise
                retries += 1
                self._retry_sleep(attempt)
                continue
            rec = holder[0]
            rec.retries = retries
            self._finish(rec, t0, None)
            return tid
        raise AssertionError("unreachable")  # pragma: no cover

    def _send_once(self, plan: _Plan, src: int, dst: int, holder: list) -> int:
        store = self.backend.store
        header = plan.header
        with self._pair_lock(src, dst):
            seq = self._send_seq.get(dst, 0)
            self._send_seq[dst] = seq + 1
            tid = (src << 40) | (seq & ((1 << 40) - 1))
            header.transfer_id = tid
            rec = self._new_record(src, dst, "sender", tid)
            holder.append(rec)
            self._fill_record(rec, header)
            keys = _Keys(src, dst, seq)
            deadline = time.monotonic() + self.timeout_s
            store.set(keys.hdr, encode_header(header))
            if self._fault_hook:
                self._fault_hook("header", transfer_id=tid)
            ready = self._settle(keys.ready, deadline, "waiting for the receiver")
            if ready != _CANCELLED:  # a CANCELLED mark stays for the receiver to find
                store.delete_key(keys.ready)
            if ready == _CANCELLED:
                raise KVTransferTimeoutError(
                    f"transfer {tid}: rank {dst} did not take it within {self.timeout_s} s"
                )
            if not ready.startswith(_OK):
                raise _remote_error(ready, "receiver refused the transfer", rec)
            mode, per_message, dst_ids = self._parse_ready(ready, header)
            if mode == MODE_DIRECT:
                runs = _runs(header.src_block_ids, dst_ids)
                views = _direct_views(plan.source, runs, 0, per_message)
                checksum = self._direct(header, views, dst, seq, deadline, True)
            else:
                checksum = self._stream(plan, dst, seq, deadline)
            store.set(
                keys.trl, encode_trailer(tid, header.num_chunks, header.checksum_algo, checksum)
            )
            ack = self._settle(keys.ack, deadline, "waiting for the receiver's ack")
            if ack != _CANCELLED:
                store.delete_key(keys.ack)
            if ack == _CANCELLED:
                raise KVTransferTimeoutError(
                    f"transfer {tid}: rank {dst} did not acknowledge within {self.timeout_s} s"
                )
            if ack != _OK:
                raise _remote_error(ack, "receiver rejected the data", rec)
            return tid

    @staticmethod
    def _parse_ready(ready: bytes, header: TransferHeader) -> tuple[int, int, list[int]]:
        """(mode, blocks per message, receiver block ids) of a ready message."""
        body = ready[len(_OK) :]
        if not body:
            return MODE_STAGED, 0, []
        n = _READY_DIRECT.size
        if len(body) != n + 4 * header.num_blocks:
            raise KVTransferFailedError(f"malformed ready message of {len(ready)} bytes")
        mode, per_message = _READY_DIRECT.unpack_from(body)
        if mode != MODE_DIRECT or per_message <= 0:
            raise KVTransferFailedError(f"malformed ready message (mode {mode}, {per_message})")
        return mode, per_message, list(struct.unpack(f"<{header.num_blocks}I", body[n:]))

    def _direct(
        self,
        header: TransferHeader,
        views,
        peer: int,
        seq: int,
        deadline: float,
        send: bool,
        errors: list[Exception] | None = None,
        guard: TailGuard | None = None,
    ) -> int:
        """Move the run views one message each, ``max_inflight * 16`` in flight;
        returns the checksum of the bytes in message order. The receiver checks
        each message's length with ``guard`` and collects failures in ``errors``
        (see ``_drain``)."""
        import torch

        cs = Checksum(header.checksum_algo)
        window = self.max_inflight * 16
        inflight: deque = deque()
        op = self.backend.expose if send else self.backend.fetch
        stage = "chunk_sent" if send else "chunk_received"

        def finish_one() -> None:
            m, work, view, token = inflight.popleft()
            work.wait(_check_time(deadline, f"message {m}"))
            if not send:
                try:
                    guard.check(token, f"message {m}")
                    if self._fault_hook:
                        self._fault_hook(stage, chunk=view.reshape(-1).view(torch.uint8), index=m)
                    if header.checksum_algo != "none":
                        cs.update(self._bytes_of(view))
                except Exception as exc:
                    errors.append(exc)

        for m, view in enumerate(views):
            if len(inflight) >= window:
                finish_one()
            if send and header.checksum_algo != "none":
                # hash first: the message is then hot in cache when the transport reads it
                cs.update(self._bytes_of(view))
            if send and self._fault_hook:
                self._fault_hook(stage, chunk=view.reshape(-1).view(torch.uint8), index=m)
            token = None if send else guard.arm(view)
            inflight.append((m, op(peer, _tag(seq, m), view), view, token))
        while inflight:
            finish_one()
        return cs.value()

    def _stream(self, plan: _Plan, dst: int, seq: int, deadline: float) -> int:
        h = plan.header
        cs = Checksum(h.checksum_algo)
        dev = str(plan.source.device)
        cap = h.blocks_per_chunk * h.bytes_per_block
        nbuf = min(self.max_inflight, h.num_chunks)
        free = (
            []
            if plan.wire_chunks is not None
            else [self._staging.take(dev, cap) for _ in range(nbuf)]
        )
        inflight: deque = deque()
        ok = False
        try:
            for c in range(h.num_chunks):
                if len(inflight) >= self.max_inflight:
                    work, buf = inflight.popleft()
                    work.wait(_check_time(deadline, f"sending chunk {c}"))
                    if buf is not None:
                        free.append(buf)
                if plan.wire_chunks is not None:
                    wire, buf = plan.wire_chunks[c], None
                else:
                    buf = free.pop()
                    wire = self._gather(plan, c, buf)
                if h.checksum_algo != "none":
                    cs.update(self._bytes_of(wire))
                if self._fault_hook:
                    self._fault_hook("chunk_sent", chunk=wire, index=c)
                inflight.append((self.backend.expose(dst, _tag(seq, c), wire), buf))
            while inflight:
                work, buf = inflight.popleft()
                work.wait(_check_time(deadline, "sending the last chunks"))
                if buf is not None:
                    free.append(buf)
            ok = True
        finally:
            if ok:  # buffers of failed sends may still be read by the transport
                for buf in free:
                    self._staging.give(dev, buf)
        return cs.value()

    # -- distributed receiver ----------------------------------------------------
    def receive(
        self,
        pool: KVPool | None = None,
        *,
        src_rank: int | None = None,
        timeout_s: float | None = None,
        keep_handles: bool = True,
    ) -> ReceivedTransfer:
        """Wait for the next transfer to this rank and commit it into ``pool``.

        Args:
            pool: the receiving pool (default: the one registered for this rank).
            src_rank: take transfers from this rank only (default: any peer).
            timeout_s: how long to wait for a transfer to *start* (default:
                the engine's ``timeout_s``); once started, each wait is bounded
                by the engine's ``timeout_s``.
            keep_handles: return live handles (the caller frees them) or free
                them after caching (blocks stay cached and evictable).

        Raises:
            KVTransferTimeoutError: no transfer started in time, or one stalled.
            KVChecksumMismatchError / KVTransferFailedError: the transfer failed;
                nothing of it is visible in ``pool`` and its blocks are free.
        """
        if self.backend.local:
            raise KVConfigError("the in-process backend has no receiver: transfers are direct")
        pool = pool if pool is not None else self._pool_for(self.backend.rank)
        if pool.storage is None:
            raise KVConfigError("a metadata-only pool cannot receive KV")
        me = self.backend.rank
        peers = (
            [src_rank]
            if src_rank is not None
            else [r for r in range(self.backend.world_size) if r != me]
        )
        wait_s = self.timeout_s if timeout_s is None else float(timeout_s)
        idle_deadline = time.monotonic() + wait_s
        store = self.backend.store
        pause = 0.0002
        while True:
            with self._recv_lock:
                for p in peers:
                    seq = self._recv_seq.get(p, 0)
                    keys = _Keys(p, me, seq)
                    if store.check([keys.hdr]):
                        raw = store.get(keys.hdr)
                        store.delete_key(keys.hdr)
                        self._recv_seq[p] = seq + 1
                        break
                else:
                    raw = None
            if raw is not None:
                got = self._receive_one(pool, p, seq, raw, keep_handles)
                if got is not None:
                    return got
                continue  # the sender had already given up on that one
            if time.monotonic() >= idle_deadline:
                raise KVTransferTimeoutError(
                    f"no transfer arrived at rank {me} within {wait_s} s", peers=peers
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def serve(
        self,
        pool: KVPool | None = None,
        *,
        num_transfers: int | None = None,
        idle_timeout_s: float | None = None,
        stop_event: threading.Event | None = None,
        src_rank: int | None = None,
    ) -> list[TransferRecord]:
        """Receive transfers until ``num_transfers`` were handled (failed ones
        count), ``stop_event`` is set, or none started for ``idle_timeout_s``
        (default: the engine's ``timeout_s``). Each transfer's blocks are cached
        and its handles freed, so they stay cached and evictable. A failed
        transfer is cleaned up and recorded, and serving goes on. Returns the
        records, in arrival order."""
        out: list[TransferRecord] = []
        idle = self.timeout_s if idle_timeout_s is None else float(idle_timeout_s)
        idle_deadline = time.monotonic() + idle
        while num_transfers is None or len(out) < num_transfers:
            if stop_event is not None and stop_event.is_set():
                break
            left = idle_deadline - time.monotonic()
            if left <= 0:
                break
            try:
                got = self.receive(
                    pool, src_rank=src_rank, timeout_s=min(left, 0.2), keep_handles=False
                )
                out.append(got.record)
            except KVTransferFailedError as exc:
                tid = exc.details.get("transfer_id")
                if tid is None:  # nothing arrived in this slice
                    continue
                out.append(self._record(tid))
            idle_deadline = time.monotonic() + idle
        return out

    def _receive_one(
        self, pool: KVPool, src: int, seq: int, raw: bytes, keep_handles: bool
    ) -> ReceivedTransfer | None:
        store = self.backend.store
        keys = _Keys(src, self.backend.rank, seq)
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        try:
            header = decode_header(raw)
        except KVTransferFailedError as exc:
            rec = self._new_record(src, self.backend.rank, "receiver", -(seq + 1))
            store.compare_set(keys.ready, b"", _encode_status(exc.code, exc.message))
            self._finish(rec, t0, exc)
            exc.details["transfer_id"] = rec.transfer_id
            raise
        rec = self._new_record(src, self.backend.rank, "receiver", header.transfer_id)
        self._fill_record(rec, header)
        receipt: _Receipt | None = None
        exc_out: BaseException | None = None
        tell = keys.ready  # where the sender waits for this side's verdict now
        try:
            if header.dst_rank != self.backend.rank or header.src_rank != src:
                raise KVTransferFailedError(
                    f"header routes {header.src_rank}->{header.dst_rank}, "
                    f"arrived on {src}->{self.backend.rank}"
                )
            self._check_compatible(pool, header)
            check_policy(header, self.enable_checksum)
            receipt = _Receipt(pool, header)
            if self._fault_hook:
                self._fault_hook("ready", transfer_id=header.transfer_id)
            direct = self._plan_direct(pool, header, receipt)
            ready = _OK
            if direct is not None:
                runs, per_message = direct
                ready = (
                    _OK
                    + _READY_DIRECT.pack(MODE_DIRECT, per_message)
                    + struct.pack(f"<{header.num_blocks}I", *receipt.block_ids)
                )
            if store.compare_set(keys.ready, b"", ready) != ready:
                store.delete_key(keys.ready)
                tell = None
                raise KVTransferFailedError(
                    f"transfer {header.transfer_id}: the sender gave up before the receiver was ready"
                )
            tell = keys.ack
            errors: list[Exception] = []  # while streaming: reported after the trailer
            if direct is not None:
                views = _direct_views(pool.storage.kv, runs, 1, per_message)
                guard = TailGuard(pool.storage.kv)
                checksum = self._direct(header, views, src, seq, deadline, False, errors, guard)
            else:
                checksum = self._drain(pool, header, receipt, src, seq, deadline, errors)
            trailer = self._store_wait(keys.trl, deadline, "waiting for the trailer")
            if trailer is None:
                raise KVTransferTimeoutError(f"transfer {header.transfer_id}: no trailer in time")
            store.delete_key(keys.trl)
            expected = decode_trailer(trailer, header)
            mismatch = None
            if header.checksum_algo != "none" and checksum != expected:
                mismatch = KVChecksumMismatchError(
                    f"transfer {header.transfer_id}: received bytes hash to {checksum:#x}, "
                    f"the sender's checksum is {expected:#x}"
                )
            err = verdict(errors, mismatch)
            if err is not None:
                raise err
            if self._fault_hook:
                self._fault_hook("before_ack", transfer_id=header.transfer_id)
            tell = None
            if store.compare_set(keys.ack, b"", _OK) != _OK:
                store.delete_key(keys.ack)
                raise KVTransferTimeoutError(
                    f"transfer {header.transfer_id}: the sender gave up before the ack"
                )
            handles = receipt.publish(keep_handles)
            rec.dst_handle_ids = [h.handle_id for h in handles]
            return ReceivedTransfer(rec, handles)
        except BaseException as exc:
            exc_out = exc
            if tell is not None:
                self._tell(tell, exc)
            if receipt is not None:
                receipt.abort()
            if isinstance(exc, KVCacheError) and not isinstance(exc, KVTransferFailedError):
                exc_out = KVTransferFailedError(
                    f"transfer {header.transfer_id} refused: {exc}", remote_code=exc.code
                )
            if isinstance(exc_out, KVCacheError):
                exc_out.details["transfer_id"] = rec.transfer_id
            if exc_out is not exc:
                raise exc_out from exc
            raise
        finally:
            self._finish(rec, t0, exc_out)

    def _tell(self, key: str, exc: BaseException) -> None:
        """Write this side's error as the verdict under ``key``, unless the sender
        already gave up there (then its CANCELLED mark is removed: nobody reads it)."""
        if isinstance(exc, KVCacheError):
            code, msg = exc.code, exc.message
        else:  # a bug here still reaches the sender typed, as a failed transfer
            code, msg = KVTransferFailedError.code, f"{type(exc).__name__}: {exc}"
        status = _encode_status(code, msg)
        store = self.backend.store
        try:
            if store.compare_set(key, b"", status) != status:
                store.delete_key(key)
        except Exception:  # the store is gone: the sender times out instead
            pass

    def _plan_direct(self, pool: KVPool, header: TransferHeader, receipt: _Receipt):
        """``(runs, blocks per message)`` for zero-copy transfer when it is worth it
        (see ``DIRECT_MIN_MESSAGE_BYTES``), else None."""
        if header.compression != "none" or not header.src_block_ids:
            return None
        if pool.storage.kv.is_cuda and not getattr(self.backend, "direct_cuda", False):
            return None
        runs = _runs(header.src_block_ids, receipt.block_ids)
        slab_bytes = header.bytes_per_block // (2 * header.num_layers)  # one block, layer, K/V
        per_message = max(1, self.direct_max_message_bytes // max(slab_bytes, 1))
        num_messages = _num_direct_messages(runs, header.num_layers, per_message)
        if num_messages > 0xFFFF:
            return None
        if header.payload_nbytes / num_messages < self.direct_min_message_bytes:
            return None
        return runs, per_message

    def _drain(
        self,
        pool: KVPool,
        h: TransferHeader,
        receipt: _Receipt,
        src: int,
        seq: int,
        deadline: float,
        errors: list[Exception],
    ) -> int:
        """Receive every chunk into staging and scatter it into the receipt's blocks.
        A chunk that fails its checks lands in ``errors``; the rest are still
        received and hashed (not scattered), so the sender's stream completes."""
        cs = Checksum(h.checksum_algo)
        kv = pool.storage.kv
        dev = str(kv.device)
        cap = max(h.chunk_nbytes)
        nbuf = min(self.max_inflight, h.num_chunks)
        bufs = [self._staging.take(dev, cap) for _ in range(nbuf)]
        guards = {id(b): TailGuard(b) for b in bufs}
        posted: deque = deque()
        nxt = 0
        ok = False

        def post(c: int, buf) -> None:
            wire = buf[: h.chunk_nbytes[c]]
            token = guards[id(buf)].arm(wire)
            posted.append((c, self.backend.fetch(src, _tag(seq, c), wire), buf, wire, token))

        try:
            while nxt < min(nbuf, h.num_chunks):
                post(nxt, bufs[nxt])
                nxt += 1
            while posted:
                c, work, buf, wire, token = posted.popleft()
                work.wait(_check_time(deadline, f"receiving chunk {c}"))
                try:
                    guards[id(buf)].check(token, f"chunk {c}")
                    if self._fault_hook:
                        self._fault_hook("chunk_received", chunk=wire, index=c)
                    if h.checksum_algo != "none":
                        cs.update(self._bytes_of(wire))
                    if not errors:
                        self._scatter(h, receipt, c, wire, kv)
                except Exception as exc:
                    errors.append(exc)
                if nxt < h.num_chunks:
                    post(nxt, buf)
                    nxt += 1
            ok = True
        finally:
            if ok:  # a failed recv may still be written by the transport later
                for buf in bufs:
                    self._staging.give(dev, buf)
        return cs.value()

    # -- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        """Stop the async workers and release backend resources."""
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True)
        self.backend.close()

    def __enter__(self) -> KVTransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"KVTransferEngine(backend={self.backend.name}, rank={self.rank}, "
            f"checksum={self.checksum_algo}, compression={self.compression}, "
            f"timeout_s={self.timeout_s})"
        )
