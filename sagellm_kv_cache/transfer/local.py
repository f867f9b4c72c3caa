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
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import KVBudgetExceededError, KVTransferFailedError
from .backends.inprocess import InProcessBackend
from .context import TransferContext
from .digests import SourcePieces
from .plan import (
    LOCAL_PIECE_BYTES,
    Plan,
    Receipt,
    bytes_of,
    check_compatible,
    direct_slices,
    gather,
    num_direct_messages,
    pool_kv,
    runs_of,
    scatter,
)
from .protocol import mismatch, with_retries
from .wire import Checksum, TransferHeader, decode_header, digest, encode_header

if TYPE_CHECKING:  # pragma: no cover
    from ..handle import KVHandle
    from ..pool import KVPool

__all__ = ["PARALLEL_MIN_BYTES", "LocalMover"]

#: direct moves of at least this many bytes copy and hash on two threads
PARALLEL_MIN_BYTES = 16 << 20


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
            direct = self._direct_runs(plan, header, receipt, dst_kv)
            if direct is not None:
                self._copy_direct(plan, header, *direct, dst_kv)
            else:
                self._copy_staged(plan, header, receipt, dst_kv)
            return receipt.publish(keep_handles=False)
        except BaseException:
            receipt.abort()
            raise

    def _direct_runs(
        self, plan: Plan, header: TransferHeader, receipt: Receipt, dst_kv: Any
    ) -> tuple[list[tuple[int, int, int]], int] | None:
        """(runs, blocks per piece) for a one-copy CPU -> CPU move, or None
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
        return runs, per_piece

    def _copy_direct(
        self,
        plan: Plan,
        header: TransferHeader,
        runs: list[tuple[int, int, int]],
        per_piece: int,
        dst_kv: Any,
    ) -> None:
        """Copy each piece straight into the destination blocks and compare its
        digest with the source piece's: kept from an earlier move of the same
        cached blocks (``digests.py``) or hashed now, just before the copy
        while the piece is coming into cache. A difference is checked once
        more against freshly hashed source bytes before it is reported.

        A large move runs in two halves on two threads (the copies and hashes
        release the GIL): one core copies and hashes at the speed of a plain
        single-threaded copy, and torch's own copy uses both."""
        num_layers = header.num_layers
        pieces = list(
            zip(
                direct_slices(runs, num_layers, 0, per_piece),
                direct_slices(runs, num_layers, 1, per_piece),
            )
        )
        sources = SourcePieces(self.ctx.digests, plan, header.checksum_algo)
        if header.checksum_algo != "none":
            sources.prepare(p[0] for p in pieces)
        half = len(pieces) // 2
        if header.payload_nbytes < PARALLEL_MIN_BYTES or half == 0:
            self._copy_pieces(plan, header, dst_kv, pieces, 0, sources)
            return
        errors: list[BaseException] = []

        def second_half() -> None:
            try:
                self._copy_pieces(plan, header, dst_kv, pieces[half:], half, sources)
            except BaseException as exc:  # re-raised on the calling thread
                errors.append(exc)

        worker = threading.Thread(target=second_half, name="kvx-local", daemon=True)
        worker.start()
        try:
            self._copy_pieces(plan, header, dst_kv, pieces[:half], 0, sources)
        finally:
            worker.join()
        if errors:
            raise errors[0]

    def _copy_pieces(
        self,
        plan: Plan,
        header: TransferHeader,
        dst_kv: Any,
        pieces: list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]],
        first: int,
        sources: SourcePieces,
    ) -> None:
        backend = self._backend()
        algo = header.checksum_algo
        src = plan.source
        for m, ((layer, k, a, b), (_, _, c, d)) in enumerate(pieces, first):
            s = src[layer, k, a:b].view(-1)
            t = dst_kv[layer, k, c:d].view(-1)
            if algo == "none":
                backend.copy_into(t, s, m)
                continue
            want = sources.of(layer, k, a, b, s)
            backend.copy_into(t, s, m)
            got = digest(algo, bytes_of(t))
            if got != want:
                want = sources.refresh(layer, k, a, b, s)  # a kept digest may be stale
                bad = mismatch(header.transfer_id, got, want)
                if bad is not None:
                    raise bad

    def _copy_staged(
        self, plan: Plan, header: TransferHeader, receipt: Receipt, dst_kv: Any
    ) -> None:
        """Gather each chunk (or take its compressed bytes), hash it, carry it to
        the destination device, hash what arrived and scatter it."""
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
        bad = mismatch(header.transfer_id, recv_sum.value(), send_sum.value())
        if check and bad is not None:
            raise bad
