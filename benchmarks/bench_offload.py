"""Onboarding throughput of the offload tiers vs a plain copy / read of the same bytes.

For each source (host tier, disk tier) a request's blocks are pushed down with
``manager.evict`` and then onboarded back into free device blocks
(``allocate`` + ``wait()``: the request's own copy plan); GB/s = bytes
onboarded / wall time of that call. Each repetition times the onboarding and
its baseline back to back (the machine is shared: ratios are taken per
repetition, the median reported):

* host tier vs ``torch.Tensor.copy_`` of one tensor of the same size;
* disk tier vs one ``readinto`` of one file of the same size, and vs a
  ``readinto`` of each of the tier's own block files (the same files).

Disk reads come from the page cache here (nothing drops it), so the disk rows
measure the read path (open, ``preadv`` into the device block, xxh3 check),
not the SSD.

    python benchmarks/bench_offload.py [--blocks 64] [--repeat 7]

Prints a table and writes ``benchmarks/results/offload.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from _util import SMOKE, print_table, write_json

from sagellm_kv_cache.offload import KVOffloadManager
from sagellm_kv_cache.storage import ModelShape

SHAPE = ModelShape(32, 8, 128, "bfloat16")  # llama-3-8b KV geometry
BLOCK_SIZE = 16


def _manager(tier: str, num_blocks: int, d: str) -> tuple[KVOffloadManager, list[int]]:
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
    return m, tokens


def _onboard_s(m: KVOffloadManager, tokens: list[int], tier: str, num_blocks: int) -> float:
    m.evict(num_blocks).result()  # down to the tier (promotion brought it back up)
    m.wait_all()
    t0 = time.perf_counter()
    a = m.allocate(tokens)
    res = a.wait()
    dt = time.perf_counter() - t0
    assert res.blocks_onboarded[tier] == num_blocks, res
    m.free(a.handle)
    m.wait_all()  # the plan's tail (spills, promoted files removed) must not overlap a baseline
    return dt


def host_rows(num_blocks: int, repeat: int) -> dict[str, list[float]]:
    nbytes = num_blocks * SHAPE.bytes_per_block(BLOCK_SIZE)
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    out: dict[str, list[float]] = {"onboard": [], "copy": []}
    with tempfile.TemporaryDirectory() as d:
        m, tokens = _manager("cpu", num_blocks, d)
        for _ in range(repeat):
            out["onboard"].append(_onboard_s(m, tokens, "cpu", num_blocks))
            t0 = time.perf_counter()
            dst.copy_(src)
            out["copy"].append(time.perf_counter() - t0)
        m.close()
    return out


def disk_rows(num_blocks: int, repeat: int) -> dict[str, list[float]]:
    nbytes = num_blocks * SHAPE.bytes_per_block(BLOCK_SIZE)
    out: dict[str, list[float]] = {"onboard": [], "read": [], "read_files": []}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "blob")
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20) * (nbytes >> 20))
            f.flush()
            os.fsync(f.fileno())
        buf = bytearray(nbytes)
        m, tokens = _manager("disk", num_blocks, d)
        store = m.tiers[-1].disk
        assert store is not None
        for _ in range(repeat):
            out["onboard"].append(_onboard_s(m, tokens, "disk", num_blocks))
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                f.readinto(buf)
            out["read"].append(time.perf_counter() - t0)
            m.evict(num_blocks).result()  # the block files, for the per-file baseline
            m.wait_all()
            files = [store.path_of(k) for k in list(store.keys())]
            view = memoryview(buf)
            t0 = time.perf_counter()
            pos = 0
            for p in files:
                with open(p, "rb", buffering=0) as f:
                    pos += f.readinto(view[pos:])
            out["read_files"].append(time.perf_counter() - t0)
        m.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    repeat = 1 if SMOKE else args.repeat
    nbytes = args.blocks * SHAPE.bytes_per_block(BLOCK_SIZE)
    host = host_rows(args.blocks, repeat)
    disk = disk_rows(args.blocks, repeat)

    def gbps(vals: list[float]) -> float:
        return nbytes / statistics.median(vals) / 1e9

    def ratio(a: list[float], b: list[float]) -> float:  # per repetition, side by side
        return statistics.median(y / x for x, y in zip(a, b))

    rows = [
        {"path": "onboard from host tier (cpu)", "GB/s": gbps(host["onboard"]), "x baseline": ratio(host["onboard"], host["copy"])},
        {"path": "  baseline: plain tensor copy_", "GB/s": gbps(host["copy"]), "x baseline": 1.0},
        {"path": "onboard from disk tier (preadv + xxh3)", "GB/s": gbps(disk["onboard"]), "x baseline": ratio(disk["onboard"], disk["read"])},
        {"path": "  baseline: plain readinto of one file", "GB/s": gbps(disk["read"]), "x baseline": 1.0},
        {"path": "  vs readinto of the block files", "GB/s": gbps(disk["read_files"]), "x baseline": ratio(disk["onboard"], disk["read_files"])},
    ]  # fmt: skip
    print_table(
        rows,
        f"{args.blocks} blocks x {SHAPE.bytes_per_block(BLOCK_SIZE) >> 20} MiB = "
        f"{nbytes >> 20} MiB, median of {repeat} (ratio: onboarding / baseline GB/s)",
    )
    write_json(
        "offload",
        {
            "bytes": nbytes,
            "num_blocks": args.blocks,
            "block_size": BLOCK_SIZE,
            "model_shape": "llama-3-8b",
            "repeat": repeat,
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "rows": rows,
            "seconds": {"host": host, "disk": disk},
        },
    )


if __name__ == "__main__":
    main()
