"""The sending side of a distributed transfer (see ``engine.py`` for the protocol)::

    hdr --> store;  wait ready (OK [+ direct plan] | error | CANCELLED at the deadline)
    payload: direct slabs (pipeline.move_direct) or staged chunks (stream)
    trl --> store;  wait ack (OK | error | CANCELLED at the deadline)

Each attempt is a new transfer (its own sequence number, id and record);
``protocol.with_retries`` decides which failures are tried again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from ..errors import KVTransferTimeoutError
from .context import TransferContext
from .digests import SourcePieces
from .pipeline import move_direct
from .plan import Plan, bytes_of, direct_slices, direct_views, gather, runs_of
from .protocol import (
    CANCELLED,
    MODE_DIRECT,
    OK,
    Keys,
    PeerSequences,
    check_time,
    parse_ready,
    remote_error,
    settle,
    tag,
    with_retries,
)
from .records import TransferRecord
from .wire import Checksum, encode_header, encode_trailer

__all__ = ["Sender"]


class Sender:
    """Sends plans from this rank; transfers to one peer take sequence numbers in order."""

    def __init__(self, ctx: TransferContext) -> None:
        self.ctx = ctx
        self._seqs = PeerSequences()
        self._pair_locks: dict[int, threading.Lock] = {}
        self._pair_locks_lock = threading.Lock()

    def transfer(self, plan: Plan, src: int, dst: int) -> int:
        """Send ``plan`` to ``dst``, retrying as the settings allow; returns the id."""
        s = self.ctx.settings

        def attempt(retries: int) -> int:
            holder: list[TransferRecord] = []
            t0 = time.perf_counter()
            try:
                tid = self._send_once(plan, src, dst, holder, retries)
            except BaseException as exc:
                if holder:
                    holder[0].retries = retries
                    self.ctx.book.finish(holder[0], t0, exc)
                raise
            holder[0].retries = retries
            self.ctx.book.finish(holder[0], t0, None)
            return tid

        return with_retries(s.max_retries, s.retry_backoff_ms, attempt)

    def _pair_lock(self, dst: int) -> threading.Lock:
        with self._pair_locks_lock:
            return self._pair_locks.setdefault(dst, threading.Lock())

    def _send_once(
        self, plan: Plan, src: int, dst: int, holder: list[TransferRecord], retries: int
    ) -> int:
        ctx, s = self.ctx, self.ctx.settings
        store = ctx.backend.store
        header = plan.header
        with self._pair_lock(dst):
            seq = self._seqs.take(dst)
            tid = (src << 40) | (seq & ((1 << 40) - 1))
            header.transfer_id = tid
            rec = ctx.book.open(src, dst, "sender", tid)
            holder.append(rec)
            rec.fill(header)
            keys = Keys(src, dst, seq)
            deadline = time.monotonic() + s.timeout_s
            store.set(keys.hdr, encode_header(header))
            ready = settle(store, keys.ready, deadline, "waiting for the receiver")
            if ready == CANCELLED:  # the mark stays for the receiver to find
                raise KVTransferTimeoutError(
                    f"transfer {tid}: rank {dst} did not take it within {s.timeout_s} s"
                )
            store.delete_key(keys.ready)
            if not ready.startswith(OK):
                raise remote_error(ready, "receiver refused the transfer", tid, dst)
            mode, per_message, dst_ids = parse_ready(ready, header)
            if mode == MODE_DIRECT:
                runs = runs_of(header.src_block_ids, dst_ids)
                slices = list(direct_slices(runs, header.num_layers, 0, per_message))
                # a retry hashes every piece afresh: a kept digest may be what failed
                sources = SourcePieces(ctx.digests, plan, header.checksum_algo, retries == 0)

                def source_digest(m: int, view: Any) -> int:
                    return sources.of(*slices[m], view)

                checksum = move_direct(
                    ctx.backend,
                    header,
                    direct_views(plan.source, runs, 0, per_message),
                    dst,
                    seq,
                    deadline,
                    s.max_inflight * 16,
                    send=True,
                    source_digest=source_digest,
                )
            else:
                checksum = self._stream(plan, dst, seq, deadline)
            store.set(
                keys.trl, encode_trailer(tid, header.num_chunks, header.checksum_algo, checksum)
            )
            ack = settle(store, keys.ack, deadline, "waiting for the receiver's ack")
            if ack == CANCELLED:
                raise KVTransferTimeoutError(
                    f"transfer {tid}: rank {dst} did not acknowledge within {s.timeout_s} s"
                )
            store.delete_key(keys.ack)
            if ack != OK:
                raise remote_error(ack, "receiver rejected the data", tid, dst)
            return tid

    def _stream(self, plan: Plan, dst: int, seq: int, deadline: float) -> int:
        """Staged mode: gather each chunk into a staging buffer (or take its
        compressed bytes), hash it and expose it, ``max_inflight`` at once."""
        ctx, h = self.ctx, plan.header
        cs = Checksum(h.checksum_algo)
        dev = str(plan.source.device)
        cap = h.blocks_per_chunk * h.bytes_per_block
        inflight_max = ctx.settings.max_inflight
        nbuf = 0 if plan.wire_chunks is not None else min(inflight_max, h.num_chunks)
        inflight: deque[tuple[Any, Any]] = deque()
        with ctx.staging.lease(dev, cap, nbuf) as bufs:
            free = list(bufs)

            def finish_one(what: str) -> None:
                work, buf = inflight.popleft()
                work.wait(check_time(deadline, what))
                if buf is not None:
                    free.append(buf)

            for c in range(h.num_chunks):
                if len(inflight) >= inflight_max:
                    finish_one(f"sending chunk {c}")
                if plan.wire_chunks is not None:
                    wire, buf = plan.wire_chunks[c], None
                else:
                    buf = free.pop()
                    wire = gather(plan, c, buf)
                if h.checksum_algo != "none":
                    cs.update(bytes_of(wire))
                inflight.append((ctx.backend.expose(dst, tag(seq, c), wire), buf))
            while inflight:
                finish_one("sending the last chunks")
        return cs.value()
