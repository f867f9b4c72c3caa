"""``KVTransferPipeline`` (seed API): many transfers in flight over the engine's
async form, bounded, every wait with a timeout.

::

    pipe = KVTransferPipeline(engine, max_inflight=8, timeout_s=30)
    fut = pipe.submit(handle, src_rank=0, dst_rank=1)   # waits for a slot at most timeout_s
    ids = pipe.wait_all()                              # ids of the ones that completed
    pipe.shutdown()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any

from ..errors import KVConfigError, KVInvalidTypeError, KVTransferTimeoutError
from ..handle import KVHandle
from ..transfer._args import check_number, check_rank

if TYPE_CHECKING:  # pragma: no cover
    from ..transfer import KVTransferEngine

__all__ = ["KVTransferPipeline"]


class KVTransferPipeline:
    """Submit transfers without blocking; at most ``max_inflight`` run at once.

    Args:
        engine: the ``KVTransferEngine`` (its ``transfer_kv_handle_async``).
        max_workers: the seed's name for ``max_inflight`` (used when that is None).
        max_inflight: transfers submitted and not finished, at most (default:
            the engine's ``max_workers``).
        timeout_s: default bound of ``submit``'s wait for a slot and of
            ``wait_all`` (default: the engine's ``timeout_s``).
    """

    def __init__(
        self,
        engine: KVTransferEngine,
        max_workers: int | None = None,
        *,
        max_inflight: int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        from ..transfer import KVTransferEngine

        if not isinstance(engine, KVTransferEngine):
            raise KVInvalidTypeError(
                f"engine must be a KVTransferEngine, got {type(engine).__name__}"
            )
        limit = max_inflight if max_inflight is not None else max_workers
        if limit is None:
            limit = engine.max_workers
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise KVConfigError(f"max_inflight must be a positive int, got {limit!r}")
        if timeout_s is not None:
            check_number("timeout_s", timeout_s, strict=True)
        self.engine = engine
        self.max_inflight = limit
        self.timeout_s = float(timeout_s if timeout_s is not None else engine.timeout_s)
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._pending: set[Future] = set()
        self._done_ids: list[int] = []
        self._stats = {"submitted": 0, "completed": 0, "failed": 0, "rejected": 0}
        self._closed = False

    def submit(
        self,
        handle: KVHandle,
        src_rank: int,
        dst_rank: int,
        tensor: Any = None,
        on_done: Callable[[int | None, BaseException | None], None] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Future:
        """Start one transfer; returns its future (result: the transfer id).

        Waits for a free slot at most ``timeout_s`` (default: the pipeline's).
        ``on_done(transfer_id_or_None, exception_or_None)`` runs on the worker
        thread when it ends; an exception raised there is counted, not lost.

        Raises:
            KVInvalidTypeError / KVInvalidInputError / KVConfigError: bad arguments
                or a pipeline that was shut down; nothing submitted.
            KVTransferTimeoutError: no slot freed up in time; nothing submitted.
        """
        if not isinstance(handle, KVHandle):
            raise KVInvalidTypeError(f"expected a KVHandle, got {type(handle).__name__}")
        check_rank("src_rank", src_rank)
        check_rank("dst_rank", dst_rank)
        if on_done is not None and not callable(on_done):
            raise KVInvalidTypeError("on_done must be callable or None")
        wait_s = self.timeout_s
        if timeout_s is not None:
            check_number("timeout_s", timeout_s, strict=True)
            wait_s = float(timeout_s)
        if self._closed:
            raise KVConfigError("the pipeline was shut down")
        if not self._slots.acquire(timeout=wait_s):
            with self._lock:
                self._stats["rejected"] += 1
            raise KVTransferTimeoutError(
                f"no transfer slot freed within {wait_s} s ({self.max_inflight} in flight)"
            )
        try:
            if self._closed:
                raise KVConfigError("the pipeline was shut down")
            fut = self.engine.transfer_kv_handle_async(handle, src_rank, dst_rank, tensor)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._stats["submitted"] += 1
            self._pending.add(fut)
        fut.add_done_callback(lambda f: self._finished(f, on_done))
        return fut

    def _finished(self, fut: Future, on_done) -> None:
        exc = fut.exception() if not fut.cancelled() else KVConfigError("cancelled")
        tid: Any = None if exc is not None else fut.result()
        with self._lock:
            self._pending.discard(fut)
            if exc is None:
                self._stats["completed"] += 1
                self._done_ids.append(tid)
            else:
                self._stats["failed"] += 1
        self._slots.release()
        if on_done is not None:
            try:
                on_done(tid, exc)
            except Exception:  # a caller's callback must not kill the worker
                with self._lock:
                    self._stats["callback_errors"] = self._stats.get("callback_errors", 0) + 1

    def wait_all(self, timeout: float | None = None) -> list[int]:
        """Wait until every submitted transfer ended, at most ``timeout`` seconds
        (default: the pipeline's ``timeout_s``). Returns the ids of those that
        completed since the last ``wait_all``, in completion order.

        Raises:
            KVTransferTimeoutError: some were still running at the deadline
                (``details["pending"]``); they keep running.
        """
        wait_s = self.timeout_s
        if timeout is not None:
            check_number("timeout", timeout, strict=True)
            wait_s = float(timeout)
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            left = deadline - time.monotonic()
            _, not_done = wait_futures(pending, timeout=max(left, 0))
            if not_done and time.monotonic() >= deadline:
                raise KVTransferTimeoutError(
                    f"{len(not_done)} transfers still running after {wait_s} s",
                    pending=len(not_done),
                )
        # callbacks run after futures resolve: let them land
        while True:
            with self._lock:
                if not self._pending:
                    ids, self._done_ids = self._done_ids, []
                    return ids
            if time.monotonic() >= deadline:
                raise KVTransferTimeoutError("transfers ended but not yet accounted", pending=1)
            time.sleep(0.0005)

    def pending_count(self) -> int:
        """Transfers submitted and not yet ended."""
        with self._lock:
            return len(self._pending)

    def get_stats(self) -> dict[str, int]:
        """``submitted``, ``completed``, ``failed``, ``rejected`` (no slot in time),
        ``in_flight``, ``max_inflight``."""
        with self._lock:
            out = dict(self._stats)
            out["in_flight"] = len(self._pending)
        out["max_inflight"] = self.max_inflight
        return out

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Refuse new submissions; with ``wait`` wait for the running ones (at most
        ``timeout``, default ``timeout_s``), else cancel those not started yet.
        The engine stays open (it is the caller's)."""
        self._closed = True
        if wait:
            self.wait_all(timeout)
        else:
            with self._lock:
                pending = list(self._pending)
            for f in pending:
                f.cancel()

    def __enter__(self) -> KVTransferPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)
