"""The in-process path: pool -> pool of one process, no control plane.

The header goes through ``encode_header``/``decode_header`` like a remote one
(the same validation); the receiving pool allocates a ``Receipt`` (nothing
visible), the bytes move through the in-process backend (``copy_into`` for
direct slabs, ``carry`` for staged chunks), both sides' checksums are
compared, and only then are the blocks cached. A checksum mismatch or a
receiver without room is retried (``protocol.with_retries``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import KVBudgetExceededError, KVTransferFailedError
from .backends.inprocess import InProcessBackend
from .context import TransferContext
from .plan import (
    LOCAL_PIECE_BYTES,
    Plan,
    Receipt,
    bytes_of,
    check_compatible,
    direct_views,
    gather,
    num_direct_messages,
    pool_kv,
    runs_of,
    scatter,
)
from .protocol import mismatch, with_retries
from .wire import Checksum, TransferHeader, decode_header, encode_header

if TYPE_CHECKING:  # pragma: no cover
    from ..handle import KVHandle
    from ..pool import KVPool

__all__ = ["LocalMover"]


class LocalMover:
    """Moves plans between two registered pools of this process."""

    def __init__(self, ctx: TransferContext) -> None:
        self.ctx = ctx
        self._ids = itertools.count(1)

    def transfer(self, plan: Plan, src: int, dst: int) -> int:
        ctx = self.ctx
        tid = next(self._ids)
        plan.header.transfer_id = tid
        rec = ctx.book.open(src, dst, "local", tid)
        rec.fill(plan.header)
        t0 = time.perf_counter()
        exc: BaseException | None = None
        try:
            dst_pool = ctx.pool_for(dst)
            header = decode_header(encode_header(plan.header))  # same validation as the wire
            check_compatible(dst_pool, header)

            def attempt(retries: int) -> list[KVHandle]:
                rec.retries = retries
                try:
                    return self._once(plan, header, dst_pool)
                except KVBudgetExceededError as e:
                    raise KVTransferFailedError(
                        f"rank {dst} has no room: {e.message}", remote_code=e.code
                    ) from e

            s = ctx.settings
            handles = with_retries(s.max_retries, s.retry_backoff_ms, attempt)
            rec.dst_handle_ids = [h.handle_id for h in handles]
        except BaseException as e:
            exc = e
            raise
        finally:
            ctx.book.finish(rec, t0, exc)
        return tid

    def _backend(self) -> InProcessBackend:
        return self.ctx.backend  # type: ignore[return-value]

    def _once(self, plan: Plan, header: TransferHeader, dst_pool: KVPool) -> list[KVHandle]:
        receipt = Receipt(dst_pool, header)
        try:
            dst_kv = pool_kv(dst_pool)
            pieces = self._direct_pieces(plan, header, receipt, dst_kv)
            if pieces is not None:
                sums = self._copy_direct(header, pieces)
            else:
                sums = self._copy_staged(plan, header, receipt, dst_kv)
            if header.checksum_algo != "none":
                bad = mismatch(header.transfer_id, sums[1], sums[0])
                if bad is not None:
                    raise bad
            return receipt.publish(keep_handles=False)
        except BaseException:
            receipt.abort()
            raise

    def _direct_pieces(
        self, plan: Plan, header: TransferHeader, receipt: Receipt, dst_kv: Any
    ) -> Iterator[tuple[Any, Any]] | None:
        """Pairs of (source, destination) views for a one-copy CPU -> CPU move, or None
        (compression, explicit tensors, CUDA, or runs too short to beat staging)."""
        src = plan.source
        if plan.wire_chunks is not None or not plan.block_ids or src.is_cuda or dst_kv.is_cuda:
            return None
        runs = runs_of(plan.block_ids, receipt.block_ids)
        slab_bytes = header.bytes_per_block // (2 * header.num_layers)
        per_piece = max(1, LOCAL_PIECE_BYTES // max(slab_bytes, 1))
        n = num_direct_messages(runs, header.num_layers, per_piece)
        if header.payload_nbytes / n < self.ctx.settings.direct_min_message_bytes:
            return None
        return zip(direct_views(src, runs, 0, per_piece), direct_views(dst_kv, runs, 1, per_piece))

    def _copy_direct(
        self, header: TransferHeader, pieces: Iterator[tuple[Any, Any]]
    ) -> tuple[int, int]:
        """Copy each piece straight into the destination blocks; hash the source
        piece before and the destination piece right after the copy, while both
        are still in cache. Returns (source, destination) checksums."""
        backend = self._backend()
        check = header.checksum_algo != "none"
        send_sum, recv_sum = Checksum(header.checksum_algo), Checksum(header.checksum_algo)
        for m, (s, d) in enumerate(pieces):
            if check:
                send_sum.update(bytes_of(s))
            backend.copy_into(d, s, m)
            if check:
                recv_sum.update(bytes_of(d))
        return send_sum.value(), recv_sum.value()

    def _copy_staged(
        self, plan: Plan, header: TransferHeader, receipt: Receipt, dst_kv: Any
    ) -> tuple[int, int]:
        """Gather each chunk (or take its compressed bytes), carry it to the
        destination device and scatter it. Returns (source, destination) checksums."""
        ctx, backend = self.ctx, self._backend()
        check = header.checksum_algo != "none"
        src_dev, dst_dev = str(plan.source.device), str(dst_kv.device)
        send_sum, recv_sum = Checksum(header.checksum_algo), Checksum(header.checksum_algo)
        buf = ctx.staging.take(src_dev, header.blocks_per_chunk * header.bytes_per_block)
        try:
            for c in range(header.num_chunks):
                if plan.wire_chunks is not None:
                    wire = plan.wire_chunks[c]
                else:
                    wire = gather(plan, c, buf)
                if check:
                    send_sum.update(bytes_of(wire))
                moved = backend.carry(wire, dst_dev, c)
                if check:
                    recv_sum.update(bytes_of(moved))
                scatter(header, receipt.block_ids, c, moved, dst_kv)
        finally:
            ctx.staging.give(src_dev, buf)
        return send_sum.value(), recv_sum.value()
