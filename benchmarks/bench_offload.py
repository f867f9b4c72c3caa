"""Onboarding throughput of the offload tiers vs a plain copy / read of the same bytes.

For each source (host tier, disk tier) a request's blocks are pushed down with
``manager.evict`` and then onboarded back into free device blocks
(``allocate`` + ``wait()``: the request's own copy plan); GB/s = bytes
onboarded / wall time of that call. Each repetition times the onboarding and
its baseline back to back (the machine is shared: ratios are taken per
repetition, the median reported). Each timing is taken twice: wall time (the
GB/s column) and process CPU time (every thread of the process: the copy
worker does the onboarding while the caller waits). Both sides are
single-threaded but for torch's ``copy_``, which may use its intra-op threads
on either side; the CPU-time ratio is the one to quote on a loaded machine
(other processes stretch wall time, not CPU time):

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
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from _util import SMOKE, print_table, write_json

from sagellm_kv_cache.offload import KVOffloadManager
from sagellm_kv_cache.storage import ModelShape

SHAPE = ModelShape(32, 8, 128, "bfloat16")  # llama-3-8b KV geometry
BLOCK_SIZE = 16


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


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


def _onboard_s(
    m: KVOffloadManager, tokens: list[int], tier: str, num_blocks: int
) -> tuple[float, float]:
    m.evict(num_blocks).result()  # down to the tier (promotion brought it back up)
    m.wait_all()
    w, c = time.perf_counter(), time.process_time()
    a = m.allocate(tokens)
    res = a.wait()
    dt = time.perf_counter() - w, time.process_time() - c
    assert res.blocks_onboarded[tier] == num_blocks, res
    m.free(a.handle)
    m.wait_all()  # the plan's tail (spills, promoted files removed) must not overlap a baseline
    return dt


Times = dict[str, list[tuple[float, float]]]  # name -> (wall s, cpu s) per repetition


def host_rows(num_blocks: int, repeat: int) -> Times:
    nbytes = num_blocks * SHAPE.bytes_per_block(BLOCK_SIZE)
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    out: Times = {"onboard": [], "copy": []}
    with tempfile.TemporaryDirectory() as d:
        m, tokens = _manager("cpu", num_blocks, d)
        for _ in range(repeat):
            out["onboard"].append(_onboard_s(m, tokens, "cpu", num_blocks))
            out["copy"].append(_timed(lambda: dst.copy_(src)))
        m.close()
    return out


def _read_one(path: str, buf: bytearray) -> None:
    with open(path, "rb", buffering=0) as f:
        f.readinto(buf)


def _read_each(files: list, view: memoryview) -> None:
    pos = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            pos += f.readinto(view[pos:])


def disk_rows(num_blocks: int, repeat: int) -> Times:
    nbytes = num_blocks * SHAPE.bytes_per_block(BLOCK_SIZE)
    out: Times = {"onboard": [], "read": [], "read_files": []}
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
            out["read"].append(_timed(lambda: _read_one(path, buf)))
            m.evict(num_blocks).result()  # the block files, for the per-file baseline
            m.wait_all()
            files = [store.path_of(k) for k in list(store.keys())]
            out["read_files"].append(_timed(functools.partial(_read_each, files, memoryview(buf))))
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

    def gbps(vals: list[tuple[float, float]]) -> float:  # wall
        return nbytes / statistics.median(w for w, _ in vals) / 1e9

    def ratio(a: list, b: list, k: int) -> float:  # per repetition, side by side (0 wall, 1 cpu)
        return statistics.median(y[k] / x[k] for x, y in zip(a, b))

    def vs(onboard: list, base: list) -> dict[str, float]:
        return {
            "x baseline (cpu)": ratio(onboard, base, 1),
            "x baseline (wall)": ratio(onboard, base, 0),
        }

    one = {"x baseline (cpu)": 1.0, "x baseline (wall)": 1.0}
    rows = [
        {"path": "onboard from host tier (cpu)", "GB/s": gbps(host["onboard"]), **vs(host["onboard"], host["copy"])},
        {"path": "  baseline: plain tensor copy_", "GB/s": gbps(host["copy"]), **one},
        {"path": "onboard from disk tier (preadv + xxh3)", "GB/s": gbps(disk["onboard"]), **vs(disk["onboard"], disk["read"])},
        {"path": "  baseline: plain readinto of one file", "GB/s": gbps(disk["read"]), **one},
        {"path": "  vs readinto of the block files", "GB/s": gbps(disk["read_files"]), **vs(disk["onboard"], disk["read_files"])},
    ]  # fmt: skip
    print_table(
        rows,
        f"{args.blocks} blocks x {SHAPE.bytes_per_block(BLOCK_SIZE) >> 20} MiB = "
        f"{nbytes >> 20} MiB, median of {repeat} (ratio: baseline time / onboarding time, "
        "per repetition; GB/s: wall)",
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
