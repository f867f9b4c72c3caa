"""The receiving side of a distributed transfer (see ``engine.py`` for the protocol)::

    take hdr  ->  validate, check policy, allocate (a Receipt: nothing visible)
    ready     <-  OK [+ direct plan] via compare_set (or the error code)
    payload   ->  direct slabs into the new blocks, or staged chunks scattered
    trl       ->  compare checksums (``guard.verdict`` picks what to report)
    ack       <-  OK via compare_set, then the blocks are cached (visible)

Whatever fails on this side is written as the verdict where the sender waits
(ready or ack), after consuming the rest of the stream, and the Receipt is
freed: all or nothing.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..errors import (
    KVCacheError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from .codec import require_codec
from .context import TransferContext
from .guard import TailGuard, check_policy, verdict
from .pipeline import land, move_direct
from .plan import (
    Receipt,
    bytes_of,
    check_compatible,
    direct_views,
    message_cap,
    num_direct_messages,
    pool_kv,
    runs_of,
    scatter,
)
from .protocol import (
    OK,
    Keys,
    PeerSequences,
    encode_ready,
    encode_status,
    mismatch,
    store_wait,
    tag,
    tell,
)
from .records import ReceivedTransfer
from .wire import Checksum, TransferHeader, decode_header, decode_trailer

if TYPE_CHECKING:  # pragma: no cover
    from ..pool import KVPool

__all__ = ["Receiver"]


class Receiver:
    """Takes transfers addressed to this rank, in each peer's sequence order."""

    def __init__(self, ctx: TransferContext) -> None:
        self.ctx = ctx
        self._seqs = PeerSequences()

    def receive(
        self, pool: KVPool, src_rank: int | None, wait_s: float, keep_handles: bool
    ) -> ReceivedTransfer:
        """The next transfer from ``src_rank`` (any peer when None), committed into ``pool``."""
        backend = self.ctx.backend
        me = backend.rank
        peers = (
            [src_rank]
            if src_rank is not None
            else [r for r in range(backend.world_size) if r != me]
        )
        idle_deadline = time.monotonic() + wait_s
        store = backend.store

        def header_key(peer: int, seq: int) -> str:
            return Keys(peer, me, seq).hdr

        while True:
            taken = self._seqs.wait_posted(store, peers, header_key, idle_deadline)
            if taken is None:
                raise KVTransferTimeoutError(
                    f"no transfer arrived at rank {me} within {wait_s} s", peers=peers
                )
            got = self._receive_one(pool, *taken, keep_handles)
            if got is not None:
                return got
            # None: the sender had already given up on that one; wait for the next

    def _receive_one(
        self, pool: KVPool, src: int, seq: int, raw: bytes, keep_handles: bool
    ) -> ReceivedTransfer | None:
        ctx = self.ctx
        store = ctx.backend.store
        me = ctx.backend.rank
        keys = Keys(src, me, seq)
        t0 = time.perf_counter()
        deadline = time.monotonic() + ctx.settings.timeout_s
        try:
            header = decode_header(raw)
        except KVTransferFailedError as exc:
            rec = ctx.book.open(src, me, "receiver", -(seq + 1))
            store.compare_set(keys.ready, b"", encode_status(exc.code, exc.message))
            ctx.book.finish(rec, t0, exc)
            exc.details["transfer_id"] = rec.transfer_id
            raise
        rec = ctx.book.open(src, me, "receiver", header.transfer_id)
        rec.fill(header)
        receipt: Receipt | None = None
        exc_out: BaseException | None = None
        verdict_key: str | None = keys.ready  # where the sender waits for this side's verdict
        try:
            if header.dst_rank != me or header.src_rank != src:
                raise KVTransferFailedError(
                    f"header routes {header.src_rank}->{header.dst_rank}, arrived on {src}->{me}"
                )
            check_compatible(pool, header)
            check_policy(header, ctx.settings.enable_checksum)
            if header.compression != "none":
                require_codec(header.compression)
            receipt = Receipt(pool, header)
            direct = self._plan_direct(pool, header, receipt)
            ready = OK if direct is None else encode_ready(receipt.block_ids, direct[1])
            if store.compare_set(keys.ready, b"", ready) != ready:
                store.delete_key(keys.ready)
                verdict_key = None
                raise KVTransferFailedError(
                    f"transfer {header.transfer_id}: the sender gave up before the receiver was ready"
                )
            verdict_key = keys.ack
            errors: list[Exception] = []  # while streaming: reported after the trailer
            if direct is not None:
                kv = pool_kv(pool)
                views = direct_views(kv, direct[0], 1, direct[1])
                window = ctx.settings.max_inflight * 16
                checksum = move_direct(
                    ctx.backend,
                    header,
                    views,
                    src,
                    seq,
                    deadline,
                    window,
                    send=False,
                    errors=errors,
                    guard=TailGuard(kv),
                )
            else:
                checksum = self._drain(pool, header, receipt, src, seq, deadline, errors)
            left = deadline - time.monotonic()
            trailer = store_wait(store, keys.trl, left, "waiting for the trailer")
            if trailer is None:
                raise KVTransferTimeoutError(f"transfer {header.transfer_id}: no trailer in time")
            store.delete_key(keys.trl)
            expected = decode_trailer(trailer, header)
            bad = None
            if header.checksum_algo != "none":
                bad = mismatch(header.transfer_id, checksum, expected)
            err = verdict(errors, bad)
            if err is not None:
                raise err
            verdict_key = None
            if store.compare_set(keys.ack, b"", OK) != OK:
                store.delete_key(keys.ack)
                raise KVTransferTimeoutError(
                    f"transfer {header.transfer_id}: the sender gave up before the ack"
                )
            handles = receipt.publish(keep_handles)
            rec.dst_handle_ids = [h.handle_id for h in handles]
            return ReceivedTransfer(rec, handles)
        except BaseException as exc:
            exc_out = exc
            if verdict_key is not None:
                tell(store, verdict_key, exc)
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
            ctx.book.finish(rec, t0, exc_out)

    def _plan_direct(
        self, pool: KVPool, header: TransferHeader, receipt: Receipt
    ) -> tuple[list[tuple[int, int, int]], int] | None:
        """``(runs, blocks per message)`` for zero-copy transfer when it is worth it
        (see ``plan.DIRECT_MIN_MESSAGE_BYTES``), else None."""
        s = self.ctx.settings
        if header.compression != "none" or not header.src_block_ids:
            return None
        backend = self.ctx.backend
        cuda = pool_kv(pool).is_cuda
        if cuda and not backend.direct_cuda:
            return None
        cap = message_cap(s.direct_max_message_bytes, backend.host_message_bytes, cuda)
        runs = runs_of(header.src_block_ids, receipt.block_ids)
        slab_bytes = header.bytes_per_block // (2 * header.num_layers)  # one block, layer, K/V
        per_message = max(1, cap // max(slab_bytes, 1))
        num_messages = num_direct_messages(runs, header.num_layers, per_message)
        if num_messages > 0xFFFF:
            return None
        if header.payload_nbytes / num_messages < s.direct_min_message_bytes:
            return None
        return runs, per_message

    def _drain(
        self,
        pool: KVPool,
        h: TransferHeader,
        receipt: Receipt,
        src: int,
        seq: int,
        deadline: float,
        errors: list[Exception],
    ) -> int:
        """Receive every chunk into staging and scatter it into the receipt's blocks.
        A chunk that fails its checks lands in ``errors``; the rest are still
        received and hashed (not scattered), so the sender's stream completes."""
        ctx = self.ctx
        cs = Checksum(h.checksum_algo)
        kv = pool_kv(pool)
        dev = str(kv.device)
        cap = max(h.chunk_nbytes)
        nbuf = min(ctx.settings.max_inflight, h.num_chunks)
        posted: deque[tuple[int, Any, Any, Any, Any]] = deque()
        nxt = 0
        with ctx.staging.lease(dev, cap, nbuf) as bufs:
            guards = {id(b): TailGuard(b) for b in bufs}

            def post(c: int, buf: Any) -> None:
                wire = buf[: h.chunk_nbytes[c]]
                token = guards[id(buf)].arm(wire)
                posted.append((c, ctx.backend.fetch(src, tag(seq, c), wire), buf, wire, token))

            while nxt < nbuf:
                post(nxt, bufs[nxt])
                nxt += 1
            while posted:
                c, work, buf, wire, token = posted.popleft()
                if land(work, deadline, f"receiving chunk {c}", errors):
                    try:
                        guards[id(buf)].check(token, f"chunk {c}")
                        if h.checksum_algo != "none":
                            cs.update(bytes_of(wire))
                        if not errors:
                            scatter(h, receipt.block_ids, c, wire, kv)
                    except Exception as exc:
                        errors.append(exc)
                if nxt < h.num_chunks:
                    post(nxt, buf)
                    nxt += 1
        return cs.value()
