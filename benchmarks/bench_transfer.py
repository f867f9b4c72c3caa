"""KV transfer bandwidth: the engine next to its raw backend and a memory copy.

For each payload size (KV blocks of a Llama-3-8B-shaped pool, 2 MiB per
block of 16 tokens) it runs ``--repeat`` rounds after a warm-up; each round
times every variant once (round-robin), so load on the shared cores hits
them alike, and the ratios are medians over rounds:

* ``memcpy``: ``dst.copy_(src)`` of the same bytes in one process;
* ``inprocess``: pool -> pool through the engine, checksum off and on
  (``vs_copy``: throughput against the tensor copy), and two transfers of
  half the blocks each, in turn and at once from two threads (``vs_turn``:
  throughput at once / in turn); ``cpu_s``: CPU seconds of the process (all
  threads), median over rounds: where the plain copy's is twice its wall time,
  torch's copy already runs on two cores, and two transfers at once have no
  idle core to gain from;
* ``gloo raw``: one ``isend``/``irecv`` of the pools' whole KV tensors (the
  same memory as the engine's transfer) between two processes on 127.0.0.1,
  plus a 1-byte ack;
* ``nixl raw``: one NIXL READ (UCX, ``UCX_NET_DEVICES=lo``) of the pools' whole
  KV tensors through ``NixlBackend.expose``/``fetch``, and one READ of the same
  bytes as 16 MiB descriptors (the engine's slab messages): what that layout
  costs the transport itself;
* ``<backend> engine``: ``transfer_kv_handle`` of the blocks (header, pipelined
  messages, checksum, receiver alloc + prefix-cache registration, ack), with
  and without the checksum; ``vs_raw``: raw time / engine time (receiver's clock);
  ``cpu_s``: CPU seconds of both ranks' processes (all threads) per transfer,
  median over rounds (less sensitive than wall time to load from others);
* ``zstd``/``zlib``: the gloo engine with compression (its wire ratio), and a
  table of both codecs' speed and ratio on bf16 KV.

Usage::

    python benchmarks/bench_transfer.py                 # 64 MiB and 1 GiB
    python benchmarks/bench_transfer.py --sizes-mib 4 --repeat 1    # smoke run
    python benchmarks/bench_transfer.py --backends gloo --codec none
"""

from __future__ import annotations

import argparse
import statistics
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


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_local(nbytes: int, repeat: int) -> list[dict]:
    """In-process rows, measured round-robin: each round times every variant once,
    so a burst of load on the shared cores hits all of them alike; ``vs_copy`` is
    the median over rounds of (copy time / variant time), throughput-normalised."""
    import threading

    import torch

    from sagellm_kv_cache.pool import KVPool
    from sagellm_kv_cache.transfer import KVTransferEngine

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    bpb = _shape().bytes_per_block(BLOCK_SIZE)
    num_blocks = max(2, nbytes // bpb) // 2 * 2
    half = num_blocks // 2
    pool = KVPool(num_blocks=num_blocks, block_size=BLOCK_SIZE, model_shape=_shape())
    g = torch.Generator().manual_seed(0)
    view = pool.storage.kv.view(torch.int16)
    view.copy_(torch.randint(-30000, 30000, view.shape, generator=g, dtype=torch.int16))
    # two handles of half the blocks each: one transfer moves both, two move one each
    h1, _ = pool.alloc_with_prefix(list(range(half * BLOCK_SIZE)))
    h2, _ = pool.alloc_with_prefix(list(range(10**7, 10**7 + half * BLOCK_SIZE)))
    pool.cache_blocks(h1)
    pool.cache_blocks(h2)
    engines = {}
    for checksum in (False, True):
        dst_pool = KVPool(num_blocks=num_blocks, block_size=BLOCK_SIZE, model_shape=_shape())
        eng = KVTransferEngine("inprocess", enable_checksum=checksum)
        eng.register_pool(pool, 0)
        eng.register_pool(dst_pool, 1)
        engines[checksum] = (eng, dst_pool)

    def one(checksum: bool) -> None:
        eng, dst_pool = engines[checksum]
        dst_pool.reset()
        eng.transfer_kv_handles([h1, h2], 0, 1)

    def sequential_halves() -> None:
        eng, dst_pool = engines[True]
        dst_pool.reset()
        eng.transfer_kv_handle(h1, 0, 1)
        eng.transfer_kv_handle(h2, 0, 1)

    def concurrent_halves() -> None:
        eng, dst_pool = engines[True]
        dst_pool.reset()
        t = threading.Thread(target=eng.transfer_kv_handle, args=(h2, 0, 1))
        t.start()
        eng.transfer_kv_handle(h1, 0, 1)
        t.join(timeout=600)

    variants = {
        "tensor copy": lambda: dst.copy_(src),
        "engine, checksum off": lambda: one(False),
        "engine, checksum on": lambda: one(True),
        "2 transfers in turn, checksum on": sequential_halves,
        "2 transfers at once, checksum on": concurrent_halves,
    }
    for fn in variants.values():
        fn()  # warm-up: page faults, staging buffers
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(max(repeat, 1)):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    moved = num_blocks * bpb
    copy_t = times["tensor copy"]
    rows = []
    for name, ts in times.items():
        nb = nbytes if name == "tensor copy" else moved
        ratio = _median([(c / nbytes) / (t / nb) for c, t in zip(copy_t, ts)])
        row = {"backend": "memcpy" if name == "tensor copy" else "inprocess", "variant": name}
        rows.append(
            {**row, "seconds": min(ts), "vs_copy": ratio, "nbytes": nb, "cpu_s": _median(cpu[name])}
        )
    turn = times["2 transfers in turn, checksum on"]
    once = times["2 transfers at once, checksum on"]
    rows[-1]["vs_turn"] = _median([a / b for a, b in zip(turn, once)])
    return rows


def _raw_gloo_once(ctx, buf, ack) -> None:
    """One contiguous isend/irecv, then a 1-byte ack (the engine also waits for one)."""
    from datetime import timedelta

    import torch.distributed as dist

    w = timedelta(seconds=120)
    if ctx.rank == 0:
        dist.isend(buf, 1, tag=1).wait(timeout=w)
        dist.irecv(ack, 1, tag=2).wait(timeout=w)
    else:
        dist.irecv(buf, 0, tag=1).wait(timeout=w)
        dist.isend(ack, 0, tag=2).wait(timeout=w)


def rank_bench(ctx, nbytes: int, repeat: int, variants: list[str], backend: str, engine_opts: dict):
    """Runs in two spawned ranks: rank 0 sends, rank 1 receives. Each round times
    the raw transport and every engine variant once (round-robin); returns the
    times per variant and rank 0's wire/payload ratios."""
    import itertools

    import torch
    import torch.distributed as dist

    from sagellm_kv_cache.pool import KVPool
    from sagellm_kv_cache.transfer import KVTransferEngine
    from sagellm_kv_cache.transfer.backends.nixl import NixlBackend
    from sagellm_kv_cache.transfer.plan import DIRECT_MAX_MESSAGE_BYTES

    bpb = _shape().bytes_per_block(BLOCK_SIZE)
    num_blocks = nbytes // bpb
    if ctx.rank == 0:
        pool, h = _filled_pool(num_blocks, num_blocks * BLOCK_SIZE)
    else:
        pool = KVPool(num_blocks=num_blocks, block_size=BLOCK_SIZE, model_shape=_shape())
    # the raw transport moves the same memory the engine moves: the pools' KV
    # tensors, flat (a separate buffer of the same size read 7-8% faster over
    # NIXL here, which would credit the transport with a difference of memory)
    buf = pool.storage.kv.view(-1).view(torch.uint8)
    ack = torch.zeros(1, dtype=torch.uint8)
    raw_nixl = NixlBackend(group="raw") if backend == "nixl" else None
    tags = itertools.count()
    engines = {}
    for v in variants:
        opts: dict = {"group": f"engine-{v}"} if backend == "nixl" else {}
        if v.startswith("check@"):  # NIXL: another number of messages per READ
            opts["batch_messages"] = int(v[len("check@") :])
        eng = KVTransferEngine(
            "torch" if backend == "gloo" else backend,
            timeout_s=120,
            enable_checksum=v != "nocheck",
            compression=v if v in ("zlib", "zstd") else None,
            **opts,
            **engine_opts,
        )
        eng.register_pool(pool)
        engines[v] = eng

    def raw() -> None:
        if raw_nixl is None:
            _raw_gloo_once(ctx, buf, ack)
        elif ctx.rank == 0:
            raw_nixl.expose(1, next(tags), buf).wait(120)
        else:
            raw_nixl.fetch(0, next(tags), buf).wait(120)

    def engine(v: str):
        def run() -> None:
            eng = engines[v]
            if ctx.rank == 0:
                eng.transfer_kv_handle(h, 0, 1)
            else:
                pool.reset()
                eng.receive(pool, timeout_s=120, keep_handles=False)

        return run

    # the engine moves one message per slab (kv[layer, K/V, blocks]: 16 MiB at most,
    # plan.DIRECT_MAX_MESSAGE_BYTES); a raw READ of the same bytes cut alike is
    # the transport's own cost of that layout, apart from the engine's
    pieces = list(buf.split(DIRECT_MAX_MESSAGE_BYTES))

    def raw_pieces() -> None:
        ts = [next(tags) for _ in pieces]
        if ctx.rank == 0:
            raw_nixl.expose_many(1, ts, pieces).wait(120)
        else:
            raw_nixl.fetch_many(0, ts, pieces).wait(120)

    fns = {"raw": raw, **({"raw_pieces": raw_pieces} if raw_nixl is not None else {})}
    fns.update({v: engine(v) for v in variants})
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeat + 1):  # round 0 warms up (connections, registrations, buffers)
        for k, fn in fns.items():
            if k in ("zlib", "zstd") and r > 1:
                continue  # slow: one timed run is enough
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if r:
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    dist.barrier()  # every READ is done before memory is deregistered
    out = {"times": times, "cpu": cpu}
    if ctx.rank == 0:
        for v in variants:
            meta = engines[v].get_transfer_metadata(engines[v].transfer_ids()[-1])
            out[v + "_ratio"] = meta["wire_nbytes"] / meta["payload_nbytes"]
    for eng in engines.values():
        eng.close()
    if raw_nixl is not None:
        raw_nixl.close()
    return out


RAW_NAMES = {"gloo": "raw isend/irecv + ack", "nixl": "raw READ + notif"}


def bench_dist(
    backend: str,
    nbytes: int,
    repeat: int,
    codec: str | None,
    engine_opts: dict,
    nixl_batch: list[int] | None = None,
) -> list[dict]:
    from sagellm_kv_cache.testing.launcher import launch
    from sagellm_kv_cache.transfer.plan import DIRECT_MAX_MESSAGE_BYTES

    variants = ["check", "nocheck"] + ([codec] if codec else [])
    if backend == "nixl":
        variants += [f"check@{n}" for n in nixl_batch or []]
    res = launch(
        rank_bench,
        2,
        args=(nbytes, repeat, variants, backend, engine_opts),
        timeout_s=900,
        pg_timeout_s=300,
        env={"UCX_NET_DEVICES": "lo"},
    )
    for r in res:
        if not r.ok:
            raise RuntimeError(f"{backend} rank {r.rank}: {r.status} {r.error}")
    s = res[0].value
    # the receiver's clock: a transfer is done when its data is in place
    times = res[1].value["times"]
    raw_t = times["raw"]
    cpu = {k: _median(res[0].value["cpu"][k]) + _median(v) for k, v in res[1].value["cpu"].items()}
    bpb = _shape().bytes_per_block(BLOCK_SIZE)
    moved = nbytes // bpb * bpb  # the pools' KV: what every row moves, raw ones included
    rows = [{"backend": backend, "variant": RAW_NAMES[backend], "seconds": min(raw_t)}]
    rows[0]["vs_raw"] = 1.0
    rows[0]["cpu_s"] = cpu["raw"]
    if "raw_pieces" in times:
        ts = times["raw_pieces"]
        rows.append(
            {
                "backend": backend,
                "variant": f"raw READ, {-(-moved // DIRECT_MAX_MESSAGE_BYTES)} x "
                f"{min(DIRECT_MAX_MESSAGE_BYTES, moved) >> 20} MiB descs",
                "seconds": min(ts),
                "vs_raw": _median([r / t for r, t in zip(raw_t, ts)]),
                "cpu_s": cpu["raw_pieces"],
            }
        )
    names = {"check": "engine, checksum on", "nocheck": "engine, checksum off"}
    for v in variants:
        name = names.get(v) or f"engine, {v}-1 (wire {s[v + '_ratio']:.3f}x)"
        if v.startswith("check@"):
            name = f"engine, checksum on, {v[6:]} msgs/READ"
        ts = times[v]
        ratio = _median([r / t for r, t in zip(raw_t, ts)])
        rows.append(
            {"backend": backend, "variant": name, "seconds": min(ts), "vs_raw": ratio}
            | {"cpu_s": cpu[v]}
        )
    return [r | {"nbytes": moved} for r in rows]


def bench_codecs(nbytes: int) -> list[dict]:
    """Compression speed and ratio of zlib-1 and zstd-1 on bf16 KV-like data."""
    import zlib

    import torch

    g = torch.Generator().manual_seed(0)
    kv = (torch.randn(nbytes // 2, generator=g) * 0.5).to(torch.bfloat16)
    raw = kv.view(torch.uint8).numpy().tobytes()
    rows = []
    codecs = {"zlib": lambda b: zlib.compress(b, 1)}
    try:
        import zstandard

        codecs["zstd"] = zstandard.ZstdCompressor(level=1).compress
    except ImportError:
        print("skipping zstd: pip install 'sagellm-kv-cache[zstd]'")
    for name, fn in codecs.items():
        t0 = time.perf_counter()
        out = fn(raw)
        dt = time.perf_counter() - t0
        rows.append(
            {"codec": f"{name}-1", "mb_per_s": nbytes / dt / 1e6, "ratio": len(out) / nbytes}
        )
    return rows


def _nixl_reason() -> str | None:
    from sagellm_kv_cache.transfer.backends.nixl import nixl_unavailable_reason

    return nixl_unavailable_reason()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--repeat", type=int, default=5, help="rounds (each times every variant)")
    ap.add_argument("--codec", choices=["zstd", "zlib", "none"], default="zstd")
    ap.add_argument("--backends", nargs="+", default=["gloo", "nixl"], choices=["gloo", "nixl"])
    ap.add_argument("--no-local", action="store_true", help="skip the in-process rows")
    ap.add_argument(
        "--nixl-batch",
        type=int,
        nargs="+",
        default=None,
        help="also time the NIXL engine with these many messages per READ (checksum on)",
    )
    ap.add_argument(
        "--message-mib",
        type=float,
        default=None,
        help="the engines' direct_max_message_bytes (MiB; default: the engine's)",
    )
    ap.add_argument(
        "--max-inflight",
        type=int,
        default=None,
        help="the engines' max_inflight (direct mode: 16 x this many messages in flight)",
    )
    a = ap.parse_args()
    backends = list(a.backends)
    if "nixl" in backends and (reason := _nixl_reason()) is not None:
        print(f"skipping nixl: {reason}")
        backends.remove("nixl")
    codec = None if a.codec == "none" else a.codec
    if codec == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            print("skipping zstd: pip install 'sagellm-kv-cache[zstd]'")
            codec = None
    engine_opts = {}
    if a.message_mib is not None:
        engine_opts["direct_max_message_bytes"] = int(a.message_mib * (1 << 20))
    if a.max_inflight is not None:
        engine_opts["max_inflight"] = a.max_inflight
    rows = []
    for mib in a.sizes_mib:
        nbytes = mib << 20
        t0 = time.perf_counter()
        size_rows = [] if a.no_local else bench_local(nbytes, a.repeat)
        for backend in backends:
            with_codec = codec if mib <= 256 and backend == "gloo" else None
            size_rows += bench_dist(
                backend, nbytes, a.repeat, with_codec, engine_opts, a.nixl_batch
            )
        for r in size_rows:
            nb = r.get("nbytes", nbytes)
            rows.append(
                {
                    "size_mib": mib,
                    "backend": r["backend"],
                    "variant": r["variant"],
                    "seconds": r["seconds"],
                    "gbps": nb / r["seconds"] / 1e9,
                    "vs_copy": r.get("vs_copy", float("nan")),
                    "vs_raw": r.get("vs_raw", float("nan")),
                    "vs_turn": r.get("vs_turn", float("nan")),
                    "cpu_s": r.get("cpu_s", float("nan")),
                }
            )
        print(f"{mib} MiB done in {time.perf_counter() - t0:.1f} s", flush=True)
    title = "KV transfer (GB/s = 1e9 bytes/s of the best run; vs_*: median over rounds)"
    _util.print_table(rows, title)
    codec_rows = bench_codecs(min(a.sizes_mib[0], 64) << 20)
    _util.print_table(codec_rows, "Compression of bf16 KV (one core)")
    _util.write_json(
        "bench_transfer",
        {"shape": SHAPE_ARGS, "block_size": BLOCK_SIZE, "rows": rows, "codecs": codec_rows},
    )


if __name__ == "__main__":
    main()
