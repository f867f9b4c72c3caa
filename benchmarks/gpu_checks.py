"""The checks that need a GPU, as one script (run where a CUDA device is at hand).

Sections, each independent (a failure is recorded, the others still run):

* ``tests``: the CUDA storage and in-process transfer tests (``tests/test_storage.py``
  and ``tests/test_transfer_inprocess.py`` take their ``cuda:0`` cases when a device
  is present).
* ``copies``: the baselines: a device-to-device copy, host-to-device and
  device-to-host copies from pinned and from pageable memory.
* ``pool``: ``KVPool(device="cuda")`` ``write_kv`` / ``read_kv`` of a request's KV.
* ``transfer``: ``KVTransferEngine("inprocess")`` between two CUDA pools and from a
  CUDA pool to a CPU pool, against the device copy and the pinned D2H copy.
* ``onboard``: ``KVOffloadManager`` with its device tier on CUDA, onboarding from
  the host tier, against a pinned host-to-device copy of the same bytes.
* ``nccl``: two ranks on this machine's GPUs through ``TorchDistBackend`` with
  NCCL, against raw ``dist.send``/``recv`` (needs two GPUs: NCCL refuses two ranks
  on one device, and the script records that refusal).
* ``step_table``: ``profile_step_times.py`` on this GPU, then the roofline model
  against the measured table at every grid point (error per point and MAPE).

    python benchmarks/gpu_checks.py --out DIR [--smoke]

Writes ``DIR/gpu_checks.json`` (and the step table JSON) and prints a table per
section. GB/s counts the bytes moved once (not read + write).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sagellm_kv_cache.storage import ModelShape  # noqa: E402

SHAPE = ModelShape(32, 8, 128, "bfloat16")  # llama-3-8b KV geometry: 2 MiB per 16-token block
BS = 16


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, dev: str, repeat: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(dev)
    out = []
    for _ in range(repeat):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def _gbps(nbytes: int, times: list[float]) -> dict:
    rates = [nbytes / t / 1e9 for t in times]
    return {"median_gbps": statistics.median(rates), "best_gbps": max(rates), "bytes": nbytes}


def section_tests(args) -> dict:
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
        "tests/test_storage.py", "tests/test_transfer_inprocess.py",
    ]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
    return {"rc": p.returncode, "seconds": time.perf_counter() - t0, "tail": tail}


def section_copies(args) -> dict:
    dev, n = args.device, args.mib << 20
    src_d = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    dst_d = torch.empty_like(src_d)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=dev != "cpu").random_()
    pageable = torch.empty(n, dtype=torch.uint8).random_()
    r = args.repeat
    return {
        "d2d copy": _gbps(n, _timed(lambda: dst_d.copy_(src_d), dev, r)),
        "h2d pinned": _gbps(n, _timed(lambda: dst_d.copy_(pinned, non_blocking=True), dev, r)),
        "h2d pageable": _gbps(n, _timed(lambda: dst_d.copy_(pageable), dev, r)),
        "d2h pinned": _gbps(n, _timed(lambda: pinned.copy_(src_d, non_blocking=True), dev, r)),
    }


def section_pool(args) -> dict:
    from sagellm_kv_cache.pool import KVPool

    dev, blocks = args.device, args.blocks
    pool = KVPool(num_blocks=blocks + 8, block_size=BS, model_shape=SHAPE, device=dev)
    h = pool.alloc(blocks * BS)
    kv = torch.randn(SHAPE.num_layers, 2, blocks * BS, SHAPE.num_kv_heads, SHAPE.head_dim)
    kv = kv.to(torch.bfloat16).to(dev)
    nbytes = kv.numel() * kv.element_size()
    out = {
        "write_kv": _gbps(nbytes, _timed(lambda: pool.write_kv(h, kv), dev, args.repeat)),
        "read_kv": _gbps(nbytes, _timed(lambda: pool.read_kv(h), dev, args.repeat)),
    }
    assert torch.equal(pool.read_kv(h), kv)
    pool.free(h)
    return out


def section_transfer(args) -> dict:
    from sagellm_kv_cache.pool import KVPool
    from sagellm_kv_cache.transfer import KVTransferEngine

    dev, blocks, out = args.device, args.blocks, {}
    tokens = list(range(blocks * BS))
    src = KVPool(num_blocks=blocks + 8, block_size=BS, model_shape=SHAPE, device=dev)
    h, _ = src.alloc_with_prefix(tokens)
    kv = torch.randn(SHAPE.num_layers, 2, len(tokens), SHAPE.num_kv_heads, SHAPE.head_dim)
    kv = kv.to(torch.bfloat16).to(dev)
    src.write_kv(h, kv)
    nbytes = kv.numel() * kv.element_size()
    for name, dst_dev in (("cuda->cuda", dev), ("cuda->cpu", "cpu")):
        for checksum in (True, False):
            times = []
            for i in range(args.repeat + 1):
                # a fresh receiver each time, so every repeat moves every byte
                dst = KVPool(
                    num_blocks=blocks + 8, block_size=BS, model_shape=SHAPE, device=dst_dev
                )
                eng = KVTransferEngine("inprocess", enable_checksum=checksum)
                eng.register_pool(src, 0)
                eng.register_pool(dst, 1)
                _sync(dev)
                t0 = time.perf_counter()
                eng.transfer_kv_handle(h, 0, 1)
                _sync(dev)
                times.append(time.perf_counter() - t0)
                if i == 0:
                    h2, hit = dst.alloc_with_prefix(tokens)
                    assert hit == len(tokens), hit
                    assert torch.equal(dst.read_kv(h2).to(dev), kv)
                del eng, dst
            out[f"{name} checksum={'on' if checksum else 'off'}"] = _gbps(nbytes, times[1:])
    return out


def section_onboard(args) -> dict:
    from sagellm_kv_cache.offload import KVOffloadManager

    dev, blocks = args.device, args.blocks
    m = KVOffloadManager.from_capacities(
        {"gpu": blocks, "cpu": blocks}, block_size=BS, model_shape=SHAPE, device=dev
    )
    tokens = list(range(blocks * BS))
    a = m.allocate(tokens)
    a.wait()
    kv = torch.randn(SHAPE.num_layers, 2, len(tokens), SHAPE.num_kv_heads, SHAPE.head_dim)
    m.device.write_kv(a.handle, kv.to(torch.bfloat16).to(dev))
    m.cache_blocks(a.handle)
    m.free(a.handle)
    times = []
    for _ in range(args.repeat + 1):
        m.evict(blocks).result()
        _sync(dev)
        t0 = time.perf_counter()
        a = m.allocate(tokens)
        res = a.wait()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        assert res.blocks_onboarded["cpu"] == blocks, res
        m.free(a.handle)
    m.close()
    return {"onboard cpu->cuda": _gbps(blocks * m.block_nbytes, times[1:])}


_NCCL_CHILD = r"""
import os, sys, time, torch, torch.distributed as dist
rank, world, port, mib = int(sys.argv[1]), 2, sys.argv[2], int(sys.argv[3])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dev = f"cuda:{rank % torch.cuda.device_count()}"
torch.cuda.set_device(dev)
dist.init_process_group("nccl", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
n = mib << 20
buf = torch.empty(n, dtype=torch.uint8, device=dev).random_()
rates = []
for i in range(6):
    torch.cuda.synchronize(); dist.barrier(); t0 = time.perf_counter()
    (dist.send if rank == 0 else dist.recv)(buf, 1 - rank)
    torch.cuda.synchronize(); rates.append(n / (time.perf_counter() - t0) / 1e9)
if rank == 1: print("RAW_NCCL_GBPS", sorted(rates[1:])[len(rates[1:]) // 2], flush=True)
dist.destroy_process_group()
"""


def section_nccl(args) -> dict:
    if torch.cuda.device_count() < 1:
        return {"skipped": "no CUDA device"}
    port = str(29500 + os.getpid() % 1000)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _NCCL_CHILD, str(r), port, str(args.mib)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0] + "\n[killed after 120 s]")
    return {
        "gpus": torch.cuda.device_count(),
        "rc": [p.returncode for p in procs],
        "tail": [o.strip().splitlines()[-6:] for o in outs],
    }


def section_step_table(args) -> dict:
    from sim.cost.roofline import RooflineCost
    from sim.cost.table import TableCost

    path = Path(args.out) / f"step_table_{args.gpu_name}_{args.model}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step_times.py"),
           "--model", args.model, "--device", args.device, "--out", str(path)]  # fmt: skip
    if args.smoke:
        cmd += ["--tiny", "--tokens", "1", "16", "--kv-tokens", "0", "64", "--repeat", "2"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    if p.returncode != 0:
        return {"rc": p.returncode, "tail": (p.stdout + p.stderr).splitlines()[-10:]}
    table = TableCost.load(path)
    d = table.to_dict()
    rows, errs = [], []
    if not args.smoke:
        roof = RooflineCost(model=args.model, gpu=args.gpu_name)
        for t in d["tokens"]:
            for kv in d["kv_tokens"]:
                meas = table.lookup(t, kv)
                ctx = max(int(kv) - int(t), 0)
                pred = roof.step_time([(int(t), ctx)])
                rows.append({"tokens": t, "kv_tokens": kv, "measured_s": meas, "roofline_s": pred})
                errs.append(abs(pred - meas) / meas)
    return {
        "seconds": time.perf_counter() - t0,
        "table": str(path.name),
        "roofline_vs_measured": rows,
        "roofline_mape": statistics.mean(errs) if errs else None,
        "roofline_max_ape": max(errs) if errs else None,
    }


SECTIONS = {
    "tests": section_tests,
    "copies": section_copies,
    "pool": section_pool,
    "transfer": section_transfer,
    "onboard": section_onboard,
    "nccl": section_nccl,
    "step_table": section_step_table,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mib", type=int, default=1024, help="bytes per copy baseline")
    ap.add_argument("--blocks", type=int, default=256, help="blocks per transfer/onboard")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--gpu-name", default="h200", help="sim.cost.gpus key for the roofline")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    ap.add_argument("--only", nargs="*", default=list(SECTIONS))
    args = ap.parse_args()
    if args.smoke:
        args.mib, args.blocks, args.repeat = 4, 4, 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "gpus": torch.cuda.device_count(),
        },
        "args": vars(args),
    }
    for name in args.only:
        t0 = time.perf_counter()
        try:
            report[name] = SECTIONS[name](args)
        except Exception as e:  # one section's failure must not hide the others' results
            report[name] = {"error": repr(e), "traceback": traceback.format_exc().splitlines()[-8:]}
        print(f"== {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
        print(json.dumps(report[name], indent=1, default=str)[:3000], flush=True)
        (Path(args.out) / "gpu_checks.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
