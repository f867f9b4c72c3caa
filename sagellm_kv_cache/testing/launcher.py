"""Start N local ranks on 127.0.0.1 for tests and benchmarks; always end them.

::

    from sagellm_kv_cache.testing.launcher import launch

    def worker(ctx, n):            # importable, top level (spawned processes import it)
        ...                        # ctx.rank, ctx.world_size, ctx.store; dist is initialised
        return {"rank": ctx.rank}  # picklable result

    results = launch(worker, world_size=2, args=(8,), timeout_s=60)
    assert all(r.ok for r in results)

The parent hosts the c10d ``TCPStore`` (so the control plane outlives any
rank that dies) listening on ``host`` only, 127.0.0.1 unless the caller names
another address (``make_store``: torch's own ``TCPStore`` would listen on every
interface whatever host it is given), spawns the ranks with ``multiprocessing`` (spawn), and each
rank joins a gloo process group whose timeout is ``pg_timeout_s``, never
gloo's 30-minute default. ``launch`` waits at most ``timeout_s`` for results,
then terminates, kills and joins every process it started, in a ``finally``.
Results travel back over a local ``multiprocessing`` queue between processes
this function started (never over the network).
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import KVConfigError

__all__ = ["RankContext", "RankResult", "init_rank", "launch", "make_store"]


@dataclass
class RankContext:
    """What a rank's function gets: its rank, the world size and the shared store."""

    rank: int
    world_size: int
    store: Any
    timeout_s: float
    store_host: str = "127.0.0.1"
    store_port: int = 0


@dataclass
class RankResult:
    """One rank's outcome. ``status``: ``"ok"``, ``"error"`` (raised), ``"died"``
    (exited without a result, e.g. killed) or ``"timeout"`` (still running at
    the deadline; it was killed)."""

    rank: int
    status: str
    value: Any = None
    error: str | None = None
    error_code: str | None = None
    exitcode: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def init_rank(
    rank: int,
    world_size: int,
    store_port: int,
    *,
    host: str = "127.0.0.1",
    pg_timeout_s: float = 30.0,
    backend: str = "gloo",
) -> RankContext:
    """Join the process group of a ``launch`` (or any TCPStore at host:port)."""
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    timeout = timedelta(seconds=pg_timeout_s)
    store = dist.TCPStore(host, store_port, is_master=False, timeout=timeout)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("pg", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    return RankContext(
        rank, world_size, dist.PrefixStore("app", store), pg_timeout_s, host, store_port
    )


def make_store(host: str = "127.0.0.1", port: int = 0, *, timeout_s: float = 30.0) -> Any:
    """A master c10d ``TCPStore`` that listens on ``host`` only (port 0: any free one).

    torch's ``TCPStore(host, ..., is_master=True)`` listens on every interface
    whatever ``host`` is; here the listening socket is bound to ``host`` first
    and handed over (``master_listen_fd``). The store's ``port`` is the bound one.

    Raises:
        KVConfigError: ``host`` does not resolve or cannot be bound.
    """
    import socket

    import torch.distributed as dist

    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise KVConfigError(f"cannot listen on {host!r}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        store = dist.TCPStore(
            host,
            sock.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s),
            master_listen_fd=sock.fileno(),
        )
    except OSError as exc:
        sock.close()
        raise KVConfigError(f"cannot listen on {host}:{port}: {exc}") from None
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now and closes it
    return store


def _rank_main(
    fn, rank, world_size, host, port, pg_timeout_s, backend, args, kwargs, queue
) -> None:
    import torch.distributed as dist

    try:
        ctx = init_rank(
            rank, world_size, port, host=host, pg_timeout_s=pg_timeout_s, backend=backend
        )
        value = fn(ctx, *args, **kwargs)
        queue.put((rank, "ok", value, None, None))
    except BaseException as exc:
        queue.put(
            (
                rank,
                "error",
                None,
                f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                getattr(exc, "code", None),
            )
        )
    finally:
        # tearing the group down can block on a dead peer; the parent kills us anyway
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 30.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> list[RankResult]:
    """Run ``fn(ctx, *args, **kwargs)`` in ``world_size`` spawned ranks.

    Args:
        fn: a top-level (importable) function.
        timeout_s: overall bound; ranks still running then are killed.
        pg_timeout_s: the process group's timeout (and the store's).
        env: extra environment variables for the ranks.
        host: the address the control store listens on (only there).

    Returns:
        One ``RankResult`` per rank, in rank order.
    """
    import multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    store = make_store(host, timeout_s=pg_timeout_s)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = []
    still_running: set[int] = set()
    results: dict[int, RankResult] = {}
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_rank_main,
                args=(
                    fn,
                    rank,
                    world_size,
                    host,
                    store.port,
                    pg_timeout_s,
                    backend,
                    args,
                    kwargs or {},
                    queue,
                ),
                daemon=True,
                name=f"kvx-rank{rank}",
            )
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout_s
        while len(results) < world_size and time.monotonic() < deadline:
            try:
                rank, status, value, error, code = queue.get(timeout=0.1)
                results[rank] = RankResult(rank, status, value, error, code)
            except Exception:  # queue.Empty
                pass
            if all(not p.is_alive() for p in procs):
                # drain what the dead left behind, then stop waiting
                drain_until = time.monotonic() + 1.0
                while len(results) < world_size and time.monotonic() < drain_until:
                    try:
                        rank, status, value, error, code = queue.get(timeout=0.1)
                        results[rank] = RankResult(rank, status, value, error, code)
                    except Exception:
                        pass
                break
    finally:
        still_running = {rank for rank, p in enumerate(procs) if p.is_alive()}
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
                p.join(timeout=3)
        queue.close()
        queue.join_thread()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        del store
    out = []
    for rank, p in enumerate(procs):
        r = results.get(rank)
        if r is None:
            status = "timeout" if rank in still_running else "died"
            r = RankResult(rank, status, exitcode=p.exitcode)
        r.exitcode = p.exitcode
        out.append(r)
    return out
