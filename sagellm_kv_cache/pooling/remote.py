"""``RemoteKVAccessor`` (seed API): bring a prefix cached on another node into this one.

::

    node B: fetch(hashes, current_rank=B)                 node A: serve()
      local run k0 = B.match_prefix(hashes)
      source A, run k = directory (or src_rank=)
      in-process: take A's k cached blocks (one handle, refs held), transfer A -> B
      distributed:
        store: req (hashes, min_blocks=k0+1) -------------->  k = A.match_prefix(hashes);
        <------------------ store: answer "OK:k" ----------   take the blocks if k > k0
        engine.receive(B, src_rank=A)  <-- KVTransferEngine --  transfer_kv_handle(A -> B)
      the blocks become hits on B only once all bytes arrived and the checksum
      matched (the engine's receiver registers them); on any failure B is unchanged.

A source that no longer holds what the directory says (evicted meanwhile) is a
miss (``FetchResult.num_blocks == 0``), and the stale entries leave the
directory; a transfer that fails raises the engine's typed error and leaves B
exactly as it was. Every wait is bounded by ``timeout_s``.

The whole leading run ``hashes[:k]`` travels (the engine moves whole handles):
blocks B already had are copied too and dropped on arrival (B keeps its own).
A fetch counts as a prefix lookup on the source's pool (its stats and hooks).
In distributed mode the accessor owns its engine's transfers from each source
to this rank (``receive`` takes the next one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import (
    KVBudgetExceededError,
    KVCacheError,
    KVConfigError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from ..handle import KVHandle
from ..hashing import check_block_hashes
from ..transfer._args import check_count, check_number, check_pool, check_rank
from ..transfer.protocol import PeerSequences, settle
from ._wire import CANCELLED, decode_answer, decode_request, encode_request
from .directory import BlockDirectory

if TYPE_CHECKING:  # pragma: no cover
    from ..pool import KVPool
    from ..transfer import KVTransferEngine

__all__ = ["FetchResult", "RemoteKVAccessor"]

_ROOT = "skvp"


@dataclass(slots=True, frozen=True)
class FetchResult:
    """What one fetch brought: ``num_blocks`` leading blocks now cached on
    ``dst_rank`` from ``src_rank`` (0: a miss, nothing moved)."""

    dst_rank: int
    src_rank: int | None
    num_blocks: int
    num_tokens: int
    local_blocks: int  # the leading run ``dst_rank`` held before
    transfer_id: int | None = None

    @property
    def hit(self) -> bool:
        return self.num_blocks > 0


def _keys(src: int, dst: int, seq: int) -> tuple[str, str]:
    base = f"{_ROOT}/{src}/{dst}/{seq}"
    return f"{base}/req", f"{base}/ans"


class RemoteKVAccessor:
    """Fetches prefixes cached on other nodes through a ``KVTransferEngine``.

    Args:
        engine: the transfer engine. In-process (``"inprocess"``): every pool
            in ``pools`` is registered with it at its rank. Distributed: this
            process is ``engine.backend.rank`` and ``pools`` holds its pool.
        pools: ``{rank: KVPool}`` of the nodes in this process (or one pool:
            the engine's rank).
        directory: where to look up the source of a prefix (a
            ``GlobalKVPoolManager``'s); without one, ``fetch`` needs ``src_rank``.
        timeout_s: bound on each wait (default: the engine's ``timeout_s``).
        max_prefetch: prefetches running at once.
    """

    def __init__(
        self,
        engine: KVTransferEngine,
        pools: Mapping[int, KVPool] | KVPool,
        *,
        directory: BlockDirectory | None = None,
        timeout_s: float | None = None,
        max_prefetch: int = 2,
    ) -> None:
        from ..pool import KVPool
        from ..transfer import KVTransferEngine

        if not isinstance(engine, KVTransferEngine):
            raise KVInvalidTypeError(
                f"engine must be a KVTransferEngine, got {type(engine).__name__}"
            )
        if isinstance(pools, KVPool):
            if engine.backend.local:
                raise KVConfigError("an in-process engine needs {rank: pool} for every node")
            pools = {engine.backend.rank: pools}
        if not isinstance(pools, Mapping) or not pools:
            raise KVInvalidTypeError("pools must be a non-empty {rank: KVPool} mapping")
        for rank, pool in pools.items():
            check_rank("rank", rank)
            check_pool(pool)
            if pool.storage is None:
                raise KVConfigError(f"rank {rank}'s pool is metadata-only: it holds no KV")
        if directory is not None and not isinstance(directory, BlockDirectory):
            raise KVInvalidTypeError("directory must be a BlockDirectory")
        if timeout_s is not None:
            check_number("timeout_s", timeout_s, strict=True)
        check_count("max_prefetch", max_prefetch)
        if not engine.backend.local and set(pools) != {engine.backend.rank}:
            raise KVConfigError(
                f"a distributed accessor holds this rank's pool only ({engine.backend.rank})"
            )
        self.engine = engine
        self.pools: dict[int, KVPool] = dict(pools)
        self.directory = directory
        self.timeout_s = float(timeout_s if timeout_s is not None else engine.timeout_s)
        for rank, pool in self.pools.items():
            if engine.registered_pool(rank) is not pool:
                engine.register_pool(pool, rank)
        self._max_prefetch = max_prefetch
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._req_seqs = PeerSequences()  # fetches this rank asked of each source
        self._serve_seqs = PeerSequences()  # requests this rank answered, per peer
        self._stats = {"fetches": 0, "hits": 0, "misses": 0, "stale": 0, "failed": 0, "blocks": 0}

    @property
    def distributed(self) -> bool:
        return not self.engine.backend.local

    # -- checks ----------------------------------------------------------------
    def _hashes_of(self, what: Any) -> tuple[list[Hashable], int | None]:
        if isinstance(what, KVHandle):
            return list(what.block_hashes[: what.num_tokens // what.block_size]), what.node_rank
        return check_block_hashes(what), None

    def _dst_pool(self, current_rank: Any) -> KVPool:
        check_rank("current_rank", current_rank)
        pool = self.pools.get(current_rank)
        if pool is None:
            raise KVConfigError(f"rank {current_rank}'s pool is not in this process")
        return pool

    # -- seed API ----------------------------------------------------------------
    def is_remote(self, what: Any, current_rank: int) -> bool:
        """True when the KV lies on another node: a handle whose ``node_rank`` is
        not ``current_rank``, or block hashes whose longest cached run (directory)
        is on another node and longer than ``current_rank``'s own."""
        check_rank("current_rank", current_rank)
        if isinstance(what, KVHandle):
            r = what.node_rank
            return r is not None and r != current_rank
        hashes = check_block_hashes(what)
        if self.directory is None or not hashes:
            return False
        local = self.pools.get(current_rank)
        k0 = len(local.match_prefix(block_hashes=hashes)[0]) if local is not None else 0
        rank, k = self.directory.longest_prefix(hashes, exclude=(current_rank,))
        return rank is not None and k > k0

    def fetch(
        self,
        what: Any,
        current_rank: int,
        *,
        src_rank: int | None = None,
        timeout_s: float | None = None,
    ) -> FetchResult:
        """Make the longest remotely cached leading run of ``what`` (block hashes,
        or a handle: its full blocks, from its ``node_rank``) hits in
        ``current_rank``'s pool. Returns what came (``num_blocks`` 0: a miss).

        Raises:
            KVInvalidTypeError / KVInvalidInputError / KVConfigError: bad
                arguments, a rank without a pool here; nothing changed.
            KVBudgetExceededError: ``current_rank`` has no room for the run;
                nothing changed.
            KVTransferTimeoutError / KVChecksumMismatchError /
            KVTransferFailedError: the transfer failed; ``current_rank``'s pool
                is exactly as before.
        """
        hashes, dst, src_rank, wait_s = self._checked(what, current_rank, src_rank, timeout_s)
        if self.distributed:
            encode_request(hashes, 0)  # hashes that cannot travel: refused before anything
        k0 = len(dst.match_prefix(block_hashes=hashes)[0]) if hashes else 0
        want = len(hashes)
        if src_rank is None:
            if self.directory is None:
                raise KVConfigError("no directory: fetch needs src_rank")
            src_rank, want = self.directory.longest_prefix(hashes, exclude=(current_rank,))
        with self._lock:
            self._stats["fetches"] += 1
        if src_rank is None or want <= k0:
            return self._miss(current_rank, src_rank, k0)
        if dst.peek_admission(want) is not None:
            raise KVBudgetExceededError(
                f"rank {current_rank} has no room for {want} blocks from rank {src_rank}",
                needed=want,
            )
        try:
            if self.distributed:
                res = self._fetch_remote(hashes[:want], k0, dst, current_rank, src_rank, wait_s)
            else:
                res = self._fetch_local(hashes[:want], k0, dst, current_rank, src_rank)
        except KVCacheError:
            with self._lock:
                self._stats["failed"] += 1
            raise
        if res.num_blocks == 0 and self.directory is not None:
            with self._lock:
                self._stats["stale"] += 1
        return res

    def _checked(
        self, what: Any, current_rank: Any, src_rank: Any, timeout_s: Any
    ) -> tuple[list[Hashable], KVPool, int | None, float]:
        """``fetch``'s arguments, checked: (hashes, destination pool, source rank
        or None for the directory's choice, seconds to wait)."""
        hashes, handle_rank = self._hashes_of(what)
        dst = self._dst_pool(current_rank)
        if src_rank is None:
            src_rank = handle_rank
        if src_rank is not None:
            check_rank("src_rank", src_rank)
            if src_rank == current_rank:
                raise KVInvalidInputError(f"src_rank {src_rank} is the current rank")
        wait_s = self.timeout_s
        if timeout_s is not None:
            check_number("timeout_s", timeout_s, strict=True)
            wait_s = float(timeout_s)
        return hashes, dst, src_rank, wait_s

    def prefetch(
        self,
        what: Any,
        current_rank: int,
        *,
        src_rank: int | None = None,
        timeout_s: float | None = None,
    ) -> Future:
        """``fetch`` on a worker thread; the future's result is the ``FetchResult``
        (its exception the typed error). Arguments are checked here, at once."""
        self._checked(what, current_rank, src_rank, timeout_s)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_prefetch, thread_name_prefix="kvp")
            ex = self._executor
        return ex.submit(self.fetch, what, current_rank, src_rank=src_rank, timeout_s=timeout_s)

    def get_stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Stop the prefetch workers (waits for running ones; the engine stays open)."""
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True)

    # -- paths ------------------------------------------------------------------
    def _miss(self, dst: int, src: int | None, k0: int) -> FetchResult:
        with self._lock:
            self._stats["misses"] += 1
        return FetchResult(dst, src, 0, 0, k0)

    def _hit(self, dst: KVPool, rank: int, src: int, k: int, k0: int, tid: int) -> FetchResult:
        with self._lock:
            self._stats["hits"] += 1
            self._stats["blocks"] += k
        return FetchResult(rank, src, k, k * dst.block_size, k0, tid)

    def _forget(self, src: int, stale: Sequence[Hashable]) -> None:
        if self.directory is not None and stale:
            self.directory.discard(src, stale)

    def _fetch_local(self, hashes: list, k0: int, dst: KVPool, rank: int, src: int) -> FetchResult:
        src_pool = self.pools.get(src)
        if src_pool is None:
            raise KVConfigError(f"rank {src}'s pool is not in this process")
        handle, k = _take_cached_run(src_pool, hashes, k0 + 1)
        if handle is None:
            self._forget(src, hashes[k:])
            return self._miss(rank, src, k0)
        try:
            tid = self.engine.transfer_kv_handle(handle, src, rank)
        finally:
            src_pool.free(handle)
        return self._hit(dst, rank, src, k, k0, tid)

    # -- distributed: requester ---------------------------------------------------
    def _fetch_remote(
        self, hashes: list, k0: int, dst: KVPool, rank: int, src: int, wait_s: float
    ) -> FetchResult:
        self.engine.backend.check_peer(src)
        store = self.engine.backend.store
        req, ans = _keys(src, rank, self._req_seqs.take(src))
        deadline = time.monotonic() + wait_s
        store.set(req, encode_request(hashes, k0 + 1))
        # at the deadline the answer slot is claimed: the source then sends nothing
        raw = settle(store, ans, deadline, f"fetch from rank {src}")
        if raw == CANCELLED:
            raise KVTransferTimeoutError(
                f"rank {src} did not answer the fetch within {wait_s} s", peer=src
            )
        store.delete_key(ans)
        code, k, msg = decode_answer(raw)
        if code != "OK":
            raise KVTransferFailedError(
                f"rank {src} refused the fetch: [{code}] {msg}", remote_code=code
            )
        if k > len(hashes):
            raise KVTransferFailedError(f"rank {src} offers {k} blocks of {len(hashes)} asked")
        if k <= k0:
            self._forget(src, hashes[k:])
            return self._miss(rank, src, k0)
        got = self.engine.receive(
            dst, src_rank=src, timeout_s=max(deadline - time.monotonic(), 0.001), keep_handles=False
        )
        if got.record.num_blocks != k:  # pragma: no cover - the protocol sends exactly k
            raise KVTransferFailedError(f"rank {src} sent {got.record.num_blocks} blocks, not {k}")
        return self._hit(dst, rank, src, k, k0, got.transfer_id)

    # -- distributed: source --------------------------------------------------------
    def serve(
        self,
        *,
        num_requests: int | None = None,
        stop_event: threading.Event | None = None,
        idle_timeout_s: float | None = None,
    ) -> list[dict[str, Any]]:
        """Answer peers' fetch requests from this rank's pool until ``num_requests``
        were answered, ``stop_event`` is set, or none came for ``idle_timeout_s``
        (default: ``timeout_s``). A failed transfer is recorded and serving goes
        on. Returns one record per request: peer, blocks offered, transfer id,
        error code."""
        if not self.distributed:
            raise KVConfigError("serve() is for distributed engines; in-process fetches are direct")
        if num_requests is not None and (
            isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 0
        ):
            raise KVInvalidInputError(f"num_requests must be an int >= 0, got {num_requests!r}")
        idle = self.timeout_s if idle_timeout_s is None else float(idle_timeout_s)
        me = self.engine.backend.rank
        pool = self.pools[me]
        store = self.engine.backend.store
        peers = [r for r in range(self.engine.backend.world_size) if r != me]
        out: list[dict[str, Any]] = []

        def request_key(peer: int, seq: int) -> str:
            return _keys(me, peer, seq)[0]

        while num_requests is None or len(out) < num_requests:
            taken = self._serve_seqs.wait_posted(
                store, peers, request_key, time.monotonic() + idle, stop_event
            )
            if taken is None:  # idle for ``idle`` seconds, or stopped
                break
            out.append(self._answer(pool, me, *taken))
        return out

    def _answer(self, pool: KVPool, me: int, peer: int, seq: int, raw: bytes) -> dict:
        store = self.engine.backend.store
        ans = _keys(me, peer, seq)[1]
        rec: dict[str, Any] = {"peer": peer, "seq": seq, "num_blocks": 0, "transfer_id": None,
                               "error_code": None}  # fmt: skip
        try:
            hashes, min_blocks = decode_request(raw)
        except KVTransferFailedError as exc:
            store.compare_set(ans, b"", f"ERR:{exc.code}:{exc.message[:200]}".encode())
            rec["error_code"] = exc.code
            return rec
        handle, k = _take_cached_run(pool, hashes, max(min_blocks, 1))
        try:
            offer = f"OK:{k if handle is not None else 0}".encode()
            if bytes(store.compare_set(ans, b"", offer)) != offer:
                store.delete_key(ans)  # the requester gave up: nobody waits for it
                rec["error_code"] = KVTransferTimeoutError.code
                return rec
            if handle is None:
                return rec
            rec["num_blocks"] = k
            rec["transfer_id"] = self.engine.transfer_kv_handle(handle, me, peer)
        except KVCacheError as exc:
            rec["error_code"] = exc.code
        finally:
            if handle is not None:
                pool.free(handle)
        return rec


def _take_cached_run(pool: KVPool, hashes: list, min_blocks: int) -> tuple[KVHandle | None, int]:
    """``(handle, k)``: the leading run of ``hashes`` cached in ``pool`` (``k`` blocks),
    taken as a handle when ``k >= min_blocks`` (else None); matched and taken under
    the pool's lock, so nothing is evicted between (the pool has no public form yet)."""
    with pool._lock:
        k = len(pool.match_prefix(block_hashes=hashes)[0]) if hashes else 0
        if k < min_blocks:
            return None, k
        handle, _ = pool.alloc_with_prefix(block_hashes=hashes[:k], num_tokens=k * pool.block_size)
        return handle, k
