"""KV transfer bandwidth: the engine next to its raw backend and a memory copy.

For each payload size (KV blocks of a Llama-3-8B-shaped pool, 2 MiB per
block of 16 tokens) it measures, best of ``--repeat`` after a warm-up:

* ``memcpy``: ``dst.copy_(src)`` of the same bytes in one process (the
  memory-bandwidth ceiling of this machine);
* ``inprocess engine``: pool -> pool in one process through the engine;
* ``gloo raw``: one ``isend``/``irecv`` of a contiguous tensor of the same
  bytes between two processes on 127.0.0.1, plus a 1-byte ack;
* ``nixl raw``: one NIXL READ (UCX, ``UCX_NET_DEVICES=lo``) of a contiguous
  tensor through ``NixlBackend.expose``/``fetch``; the sender's wait ends
  with the reader's completion notification;
* ``<backend> engine``: ``transfer_kv_handle`` of the blocks (header, pipelined
  messages, checksum, receiver alloc + prefix-cache registration, ack), with
  and without the checksum; ``vs_raw`` is raw time / engine time of the same
  backend;
* ``zlib``: the engine with compression (ratio and cost on this data).

Usage::

    python benchmarks/bench_transfer.py                 # 64 MiB and 1 GiB
    python benchmarks/bench_transfer.py --sizes-mib 64 256 --repeat 3
    python benchmarks/bench_transfer.py --backends gloo --no-zlib
"""

from __future__ import annotations

import argparse
import time

import _util

SHAPE_ARGS = (32, 8, 128, "bfloat16")
BLOCK_SIZE = 16


def _shape():
    from sagellm_kv_cache.storage import ModelShape

    return ModelShape(*SHAPE_ARGS)


def _filled_pool(num_blocks: int, num_tokens: int, seed: int = 0):
    import torch

    from sagellm_kv_cache.pool import KVPool

    pool = KVPool(num_blocks=num_blocks, block_size=BLOCK_SIZE, model_shape=_shape())
    tokens = [seed * 10_000_000 + t for t in range(num_tokens)]
    h, _ = pool.alloc_with_prefix(tokens)
    g = torch.Generator().manual_seed(seed)
    view = pool.storage.kv.view(torch.int16)
    view.copy_(torch.randint(-30000, 30000, view.shape, generator=g, dtype=torch.int16))
    pool.cache_blocks(h)
    return pool, h


def _best(fn, repeat: int) -> float:
    fn()  # warm-up: page faults, staging buffers, connections
    return _util.best_of(fn, repeat)


def bench_local(nbytes: int, repeat: int) -> list[dict]:
    import torch

    from sagellm_kv_cache.pool import KVPool
    from sagellm_kv_cache.transfer import KVTransferEngine

    rows = []
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = _best(lambda: dst.copy_(src), repeat)
    rows.append({"backend": "memcpy", "variant": "tensor copy", "seconds": t})
    num_blocks = nbytes // _shape().bytes_per_block(BLOCK_SIZE)
    pool, h = _filled_pool(num_blocks, num_blocks * BLOCK_SIZE)
    for checksum in (False, True):
        dst_pool = KVPool(num_blocks=num_blocks, block_size=BLOCK_SIZE, model_shape=_shape())
        eng = KVTransferEngine("inprocess", enable_checksum=checksum)
        eng.register_pool(pool, 0)
        eng.register_pool(dst_pool, 1)

        def once(eng=eng, dst_pool=dst_pool):
            dst_pool.reset()
            eng.transfer_kv_handle(h, 0, 1)

        t = _best(once, repeat)
        rows.append(
            {
                "backend": "inprocess",
                "variant": f"engine, checksum {'on' if checksum else 'off'}",
                "seconds": t,
            }
        )
    return rows


def _raw_gloo(ctx, nbytes: int, repeat: int) -> float:
    """One contiguous isend/irecv, then a 1-byte ack (the engine also waits for one)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    buf = (
        torch.ones(nbytes, dtype=torch.uint8)
        if ctx.rank == 0
        else torch.empty(nbytes, dtype=torch.uint8)
    )
    ack = torch.zeros(1, dtype=torch.uint8)
    times = []
    for _ in range(repeat + 1):
        dist.barrier()
        t0 = time.perf_counter()
        if ctx.rank == 0:
            dist.isend(buf, 1, tag=1).wait(timeout=timedelta(seconds=120))
            dist.irecv(ack, 1, tag=2).wait(timeout=timedelta(seconds=120))
        else:
            dist.irecv(buf, 0, tag=1).wait(timeout=timedelta(seconds=120))
            dist.isend(ack, 0, tag=2).wait(timeout=timedelta(seconds=120))
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _raw_nixl(ctx, nbytes: int, repeat: int) -> float:
    """One READ of a contiguous tensor through the NIXL backend's expose/fetch; the
    sender's wait ends with the reader's completion notification (its ack)."""
    import torch
    import torch.distributed as dist

    from sagellm_kv_cache.transfer.backends.nixl import NixlBackend

    backend = NixlBackend()
    buf = (
        torch.ones(nbytes, dtype=torch.uint8)
        if ctx.rank == 0
        else torch.empty(nbytes, dtype=torch.uint8)
    )
    times = []
    try:
        for i in range(repeat + 1):
            dist.barrier()
            t0 = time.perf_counter()
            if ctx.rank == 0:
                backend.expose(1, i, buf).wait(120)
            else:
                backend.fetch(0, i, buf).wait(120)
            times.append(time.perf_counter() - t0)
        dist.barrier()  # the reader is done before the memory is deregistered
    finally:
        backend.close()
    return min(times[1:])


def rank_bench(ctx, nbytes: int, repeat: int, variants: list[str], backend: str):
    """Runs in two spawned ranks: rank 0 sends, rank 1 receives."""
    import torch.distributed as dist

    from sagellm_kv_cache.pool import KVPool
    from sagellm_kv_cache.transfer import KVTransferEngine

    bpb = _shape().bytes_per_block(BLOCK_SIZE)
    num_blocks = nbytes // bpb
    out = {"raw": (_raw_gloo if backend == "gloo" else _raw_nixl)(ctx, nbytes, repeat)}
    if ctx.rank == 0:
        pool, h = _filled_pool(num_blocks, num_blocks * BLOCK_SIZE)
    else:
        pool = KVPool(num_blocks=num_blocks, block_size=BLOCK_SIZE, model_shape=_shape())
    for variant in variants:
        eng = KVTransferEngine(
            "torch" if backend == "gloo" else backend,
            timeout_s=120,
            enable_checksum=variant != "nocheck",
            compression="zlib" if variant == "zlib" else None,
        )
        eng.register_pool(pool)
        times, metas = [], []
        for _ in range(repeat + 1 if variant != "zlib" else 2):
            dist.barrier()
            t0 = time.perf_counter()
            if ctx.rank == 0:
                tid = eng.transfer_kv_handle(h, 0, 1)
                metas.append(eng.get_transfer_metadata(tid))
            else:
                pool.reset()
                eng.receive(pool, timeout_s=120, keep_handles=False)
            times.append(time.perf_counter() - t0)
        dist.barrier()
        eng.close()
        out[variant] = min(times[1:])
        if ctx.rank == 0:
            out[variant + "_ratio"] = metas[-1]["wire_nbytes"] / metas[-1]["payload_nbytes"]
    return out


RAW_NAMES = {"gloo": "raw isend/irecv + ack", "nixl": "raw READ + notif"}


def bench_dist(backend: str, nbytes: int, repeat: int, zlib: bool) -> list[dict]:
    from sagellm_kv_cache.testing.launcher import launch

    variants = ["check", "nocheck"] + (["zlib"] if zlib else [])
    res = launch(
        rank_bench,
        2,
        args=(nbytes, repeat, variants, backend),
        timeout_s=900,
        pg_timeout_s=300,
        env={"UCX_NET_DEVICES": "lo"},
    )
    for r in res:
        if not r.ok:
            raise RuntimeError(f"{backend} rank {r.rank}: {r.status} {r.error}")
    s = res[0].value
    rows = [{"backend": backend, "variant": RAW_NAMES[backend], "seconds": s["raw"]}]
    names = {"check": "engine, checksum on", "nocheck": "engine, checksum off"}
    for v in variants:
        name = names.get(v) or f"engine, zlib-1 (wire {s[v + '_ratio']:.3f}x)"
        rows.append({"backend": backend, "variant": name, "seconds": s[v]})
    return rows


def _nixl_reason() -> str | None:
    from sagellm_kv_cache.transfer.backends.nixl import nixl_unavailable_reason

    return nixl_unavailable_reason()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-zlib", action="store_true", help="skip the compression variant")
    ap.add_argument("--backends", nargs="+", default=["gloo", "nixl"], choices=["gloo", "nixl"])
    a = ap.parse_args()
    backends = list(a.backends)
    if "nixl" in backends and (reason := _nixl_reason()) is not None:
        print(f"skipping nixl: {reason}")
        backends.remove("nixl")
    rows = []
    for mib in a.sizes_mib:
        nbytes = mib << 20
        t0 = time.perf_counter()
        size_rows = bench_local(nbytes, a.repeat)
        for backend in backends:
            size_rows += bench_dist(
                backend, nbytes, a.repeat, zlib=not a.no_zlib and mib <= 256 and backend == "gloo"
            )
        raw = {r["backend"]: r["seconds"] for r in size_rows if r["variant"].startswith("raw")}
        for r in size_rows:
            r["size_mib"] = mib
            r["gbps"] = nbytes / r["seconds"] / 1e9
            r["vs_raw"] = raw[r["backend"]] / r["seconds"] if r["backend"] in raw else float("nan")
            rows.append(
                {k: r[k] for k in ("size_mib", "backend", "variant", "seconds", "gbps", "vs_raw")}
            )
        print(f"{mib} MiB done in {time.perf_counter() - t0:.1f} s", flush=True)
    _util.print_table(rows, "KV transfer bandwidth (GB/s = 1e9 bytes/s, best of runs)")
    _util.write_json(
        "bench_transfer", {"shape": SHAPE_ARGS, "block_size": BLOCK_SIZE, "rows": rows}
    )


if __name__ == "__main__":
    main()
