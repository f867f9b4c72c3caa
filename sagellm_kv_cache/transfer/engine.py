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

The parts: ``plan.py`` (what moves and its tensor layout), ``protocol.py``
(control-plane keys, verdicts, the retry rule), ``sender.py``,
``receiver.py``, ``pipeline.py`` (direct-mode messages), ``local.py`` (the
in-process path), ``records.py`` and ``backends/`` (transports). This file
is the facade: argument checks, pools, records and the seed's methods.

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

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..errors import KVConfigError, KVInvalidInputError, KVTransferFailedError
from ._args import check_count, check_handles, check_number, check_pool, check_rank
from .backends import TransferBackend, make_backend
from .codec import require_codec
from .context import Settings, TransferContext
from .local import LocalMover
from .plan import DIRECT_MIN_MESSAGE_BYTES, make_plan
from .receiver import Receiver
from .records import ReceivedTransfer, TransferBook, TransferRecord, TransferStatus
from .seed_api import TransferSeedMixin
from .sender import Sender
from .wire import make_checksum

if TYPE_CHECKING:  # pragma: no cover
    from ..handle import KVHandle
    from ..pool import KVPool

__all__ = ["KVTransferEngine", "ReceivedTransfer", "TransferRecord", "TransferStatus"]


class _Setting:
    """An engine attribute that reads and writes the shared ``Settings``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj._ctx.settings, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj._ctx.settings, self.name, value)


class KVTransferEngine(TransferSeedMixin):
    """Moves the KV blocks of handles from one pool to another, all or nothing.

    Args:
        comm_backend: ``"torch"`` (default; gloo for CPU tensors, NCCL for CUDA
            ones), ``"nixl"`` (one-sided READs over UCX, ``backends/nixl.py``),
            ``"inprocess"`` (two pools of one process), or a backend object
            implementing ``expose``/``fetch`` (``backends/base.py``).
        enable_checksum: checksum the payload (xxh3_64, crc32 without xxhash)
            and verify it on the receiver before anything becomes visible; as
            a receiver, refuse transfers that carry no checksum.
        max_retries: extra attempts after a checksum mismatch or a receiver
            that had no room (not after timeouts or dead peers).
        retry_backoff_ms: first backoff; doubles per retry.
        timeout_s: bound on every wait of one attempt (ready, each chunk, ack).
        compression: ``None``, ``"zstd"`` (level 1, the ``[zstd]`` extra) or
            ``"zlib"`` (level 1, ~25x slower than zstd); see ``codec.py``: on
            bf16 KV neither beats a fast link.
        chunk_bytes: payload chunk size; chunks are pipelined.
        max_inflight: chunks in flight at once per transfer.
        max_workers: threads behind ``transfer_kv_handle_async``.
        direct_min_message_bytes: the receiver picks zero-copy "direct" mode
            (one message per run of consecutive blocks per layer and K/V, read
            from and written into the pools' tensors) when the average message
            is at least this big; otherwise "staged" mode (gather into chunks,
            scatter on arrival).
        direct_max_message_bytes: the receiver cuts direct-mode slabs into
            messages of at most this size; None: the backend's preference for
            host memory (``host_message_bytes``: 2 MiB for gloo), else
            ``plan.DIRECT_MAX_MESSAGE_BYTES`` (16 MiB, and always for CUDA KV).
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
        direct_max_message_bytes: int | None = None,
        **backend_options: Any,
    ) -> None:
        check_number("timeout_s", timeout_s, strict=True)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise KVConfigError(f"max_retries must be an int >= 0, got {max_retries!r}")
        check_number("retry_backoff_ms", retry_backoff_ms)
        codec = "none" if compression is None else compression
        require_codec(codec)
        for name in ("chunk_bytes", "max_inflight", "max_workers"):
            check_count(name, locals()[name])
        if direct_max_message_bytes is not None:
            check_count("direct_max_message_bytes", direct_max_message_bytes)
        check_number("direct_min_message_bytes", direct_min_message_bytes)
        backend = make_backend(comm_backend, **backend_options)
        settings = Settings(
            enable_checksum=bool(enable_checksum),
            checksum_algo=make_checksum(bool(enable_checksum)),
            max_retries=max_retries,
            retry_backoff_ms=float(retry_backoff_ms),
            timeout_s=float(timeout_s),
            compression=codec,
            chunk_bytes=int(chunk_bytes),
            max_inflight=int(max_inflight),
            max_workers=int(max_workers),
            direct_min_message_bytes=int(direct_min_message_bytes),
            direct_max_message_bytes=None
            if direct_max_message_bytes is None
            else int(direct_max_message_bytes),
        )
        self._ctx = TransferContext(settings, backend, TransferBook(settings.checksum_algo, codec))
        self.book = self._ctx.book
        self._local = LocalMover(self._ctx)
        self._sender = Sender(self._ctx)
        self._receiver = Receiver(self._ctx)
        self._executor: ThreadPoolExecutor | None = None

    # the settings, readable and (for tests and tuning) writable on the engine
    enable_checksum = _Setting()
    checksum_algo = _Setting()
    max_retries = _Setting()
    retry_backoff_ms = _Setting()
    timeout_s = _Setting()
    compression = _Setting()
    chunk_bytes = _Setting()
    max_inflight = _Setting()
    max_workers = _Setting()
    direct_min_message_bytes = _Setting()
    direct_max_message_bytes = _Setting()

    @property
    def backend(self) -> TransferBackend:
        """The transport (swap it with ``use_backend``)."""
        return self._ctx.backend

    def use_backend(self, backend: TransferBackend) -> None:
        """Move later transfers over ``backend`` (a wrapper of the current one, in
        tests: ``sagellm_kv_cache.testing.faults``)."""
        self._ctx.backend = backend

    @property
    def rank(self) -> int | None:
        return None if self.backend.local else self.backend.rank

    # -- pools ---------------------------------------------------------------
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
        with self._ctx.lock:
            self._ctx.pools[rank] = pool

    def registered_pool(self, rank: int) -> KVPool | None:
        """The pool registered for ``rank``, or None."""
        return self._ctx.pool_or_none(rank)

    # -- records ---------------------------------------------------------------
    def transfer_ids(self) -> list[int]:
        """Ids of the transfers on record (both roles), ascending."""
        return self.book.ids()

    def get_transfer_status(self, transfer_id: int) -> TransferStatus:
        return self.book.get(transfer_id).status

    def get_transfer_metadata(self, transfer_id: int) -> dict[str, Any]:
        """The transfer's record as a dict (bytes, duration, GB/s, retries, error...)."""
        return self.book.get(transfer_id).to_dict()

    def get_metrics(self) -> dict[str, Any]:
        """Totals over this engine's transfers (both roles)."""
        t = self.book.totals()
        t["backend"] = self.backend.name
        return t

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
        s = self._ctx.settings
        plan = make_plan(
            handles,
            src_rank,
            dst_rank,
            self._ctx.pool_or_none(src_rank) if tensors is None else None,
            tensors,
            chunk_bytes=s.chunk_bytes,
            checksum_algo=s.checksum_algo,
            compression=s.compression,
        )
        if self.backend.local:
            self._ctx.pool_for(dst_rank)  # before a record exists: a bad rank changes nothing
            return self._local.transfer(plan, src_rank, dst_rank)
        if src_rank != self.backend.rank:
            raise KVInvalidInputError(
                f"src_rank={src_rank} but this process is rank {self.backend.rank}"
            )
        self.backend.check_peer(dst_rank)
        return self._sender.transfer(plan, src_rank, dst_rank)

    def transfer_kv_handle_async(
        self, handle: KVHandle, src_rank: int, dst_rank: int, tensor: Any = None
    ) -> Future[int]:
        """``transfer_kv_handle`` on a worker thread; the future's result is the transfer id."""
        return self._pool_executor().submit(
            self.transfer_kv_handle, handle, src_rank, dst_rank, tensor
        )

    def transfer_kv_handles_async(
        self, handles: Sequence[KVHandle], src_rank: int, dst_rank: int
    ) -> Future[int]:
        return self._pool_executor().submit(self.transfer_kv_handles, handles, src_rank, dst_rank)

    def _pool_executor(self) -> ThreadPoolExecutor:
        with self._ctx.lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="kvx")
            return self._executor

    # -- receiver API ----------------------------------------------------------
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
        pool = pool if pool is not None else self._ctx.pool_for(self.backend.rank)
        if pool.storage is None:
            raise KVConfigError("a metadata-only pool cannot receive KV")
        wait_s = self.timeout_s if timeout_s is None else float(timeout_s)
        return self._receiver.receive(pool, src_rank, wait_s, keep_handles)

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
                if not isinstance(tid, int):  # nothing arrived in this slice
                    continue
                out.append(self.book.get(tid))
            idle_deadline = time.monotonic() + idle
        return out

    # -- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        """Stop the async workers and release backend resources."""
        with self._ctx.lock:
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
