"""Onboarding throughput of the offload tiers vs a plain copy of the same bytes.

For each source (host tier, disk tier) a request's blocks are pushed down with
``manager.evict`` and then onboarded back into free device blocks
(``allocate`` + ``future.result()``); GB/s = bytes onboarded / wall time of
that call. Baselines: ``torch.Tensor.copy_`` of one tensor of the same size
and a plain ``readinto`` of one file of the same size. Disk reads usually come
from the page cache here (nothing drops it), so the disk row measures the
read path (mmap + crc32 check + copy), not the SSD.

    python benchmarks/bench_offload.py [--blocks 64] [--repeat 5]

Prints a table and writes ``benchmarks/results/offload.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from _util import RESULTS

from sagellm_kv_cache.offload import KVOffloadManager
from sagellm_kv_cache.storage import ModelShape

SHAPE = ModelShape(32, 8, 128, "bfloat16")  # llama-3-8b KV geometry
BLOCK_SIZE = 16


def onboard_gbps(tier: str, num_blocks: int, repeat: int, verify: bool = True) -> list[float]:
    out = []
    with tempfile.TemporaryDirectory() as d:
        caps = {"gpu": num_blocks, tier: num_blocks}
        m = KVOffloadManager.from_capacities(
            caps, block_size=BLOCK_SIZE, model_shape=SHAPE, disk_dir=os.path.join(d, "kv")
        )
        tokens = list(range(num_blocks * BLOCK_SIZE))
        a = m.allocate(tokens)
        a.wait()
        kv = torch.randn(32, 2, len(tokens), 8, 128).to(torch.bfloat16)
        m.device.write_kv(a.handle, kv)
        m.cache_blocks(a.handle)
        m.free(a.handle)
        for _ in range(repeat):
            m.evict(num_blocks).result()  # down to the tier (promotion brought it back up)
            t0 = time.perf_counter()
            a = m.allocate(tokens)
            res = a.wait()
            dt = time.perf_counter() - t0
            assert res.blocks_onboarded[tier] == num_blocks
            out.append(num_blocks * m.block_nbytes / dt / 1e9)
            m.free(a.handle)
        m.close()
    return out


def copy_gbps(nbytes: int, repeat: int) -> list[float]:
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        out.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return out


def file_read_gbps(nbytes: int, repeat: int) -> list[float]:
    out = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "blob")
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20) * (nbytes >> 20))
            f.flush()
            os.fsync(f.fileno())
        buf = bytearray(nbytes)
        for _ in range(repeat):
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                f.readinto(buf)
            out.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    nbytes = args.blocks * SHAPE.bytes_per_block(BLOCK_SIZE)
    rows = {
        "onboard from host tier (cpu)": onboard_gbps("cpu", args.blocks, args.repeat),
        "onboard from disk tier (mmap + crc32)": onboard_gbps("disk", args.blocks, args.repeat),
        "plain tensor copy_": copy_gbps(nbytes, args.repeat),
        "plain file readinto": file_read_gbps(nbytes, args.repeat),
    }
    print(
        f"{args.blocks} blocks x {SHAPE.bytes_per_block(BLOCK_SIZE) >> 20} MiB = {nbytes >> 20} MiB"
    )
    print(f"{'path':<40} {'median GB/s':>12} {'best GB/s':>10}")
    for name, vals in rows.items():
        print(f"{name:<40} {statistics.median(vals):>12.2f} {max(vals):>10.2f}")
    out = RESULTS / "offload.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bytes": nbytes,
                "num_blocks": args.blocks,
                "block_size": BLOCK_SIZE,
                "model_shape": "llama-3-8b",
                "repeat": args.repeat,
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(),
                },
                "gbps": {k: {"median": statistics.median(v), "all": v} for k, v in rows.items()},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
