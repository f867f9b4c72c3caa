"""Bad input where bytes cross a boundary: offload tiers, the disk store, transfers,
trace readers and the CLI. One row per case (see ``test_bad_input_table.py``).

Library rows assert the typed error, its ``code`` and an unchanged snapshot
(stats, pools, tier indexes, files on disk, transfer records); reader rows
also that the message names ``file:line``. CLI rows assert a non-zero exit,
no traceback and a message naming the option, or the file and line.
"""

from __future__ import annotations

import gzip
import json
import os
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from sagellm_kv_cache import KVTransferEngine
from sagellm_kv_cache.errors import (
    KVBudgetExceededError,
    KVCacheMissError,
    KVChecksumMismatchError,
    KVConfigError,
    KVDoubleFreeError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVStorageError,
    KVStorageLockedError,
    KVTraceFormatError,
)
from sagellm_kv_cache.offload import DiskBlockStore, KVOffloadManager, TierConfig
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.storage import ModelShape
from tests._snapshots import EntryPoint, Row, run_row, snap_dir, snap_offload, snap_pool
from traces import iter_trace_batches, read_trace

pytestmark = pytest.mark.timeout(120)

SHAPE = ModelShape(2, 2, 4, "float16")
BS = 4
T8 = list(range(100, 108))
TYPE, INPUT, CONFIG, FMT = (
    KVInvalidTypeError,
    KVInvalidInputError,
    KVConfigError,
    KVTraceFormatError,
)
CALLER = (KVInvalidInputError, KVInvalidTypeError)
MISSING = (KVCacheMissError, KVStorageError)  # a block that is not (or no longer) stored


def gen(xs):
    return (x for x in xs)


def kv(n: int, value: float = 1.0) -> torch.Tensor:
    return torch.full((2, 2, n, 2, 4), value).half()


def new(name: str) -> EntryPoint:
    return EntryPoint(f"{name}.new", lambda t: None)


# -- KVOffloadManager ----------------------------------------------------------------------------
def make_offload(tmp_path) -> types.SimpleNamespace:
    """gpu 4 blocks, cpu 8: one prompt cached and freed, one live cached handle ``h``."""
    m = KVOffloadManager.from_capacities(
        {"gpu": 4, "cpu": 8}, block_size=BS, model_shape=SHAPE, async_copies=False
    )
    old = m.allocate(list(range(200, 208)))
    old.wait(10)
    m.device.write_kv(old.handle, kv(8, 2.0))
    m.cache_blocks(old.handle)
    m.free(old.handle)
    a = m.allocate(T8)
    a.wait(10)
    m.device.write_kv(a.handle, kv(8, 3.0))
    m.cache_blocks(a.handle)
    alien = KVPool(num_blocks=4, block_size=BS, model_shape=SHAPE).alloc(4)
    return types.SimpleNamespace(m=m, h=a.handle, dead=old.handle, alien=alien)


OFF = EntryPoint(
    "KVOffloadManager",
    make_offload,
    lambda c: snap_offload(c.m),
    lambda c: c.m.check_invariants(),
    lambda c: c.m.close(),
)
NEW = new("KVOffloadManager")
GPU4 = {"gpu": 4}

ROWS = [
    Row("alloc-nothing", OFF, lambda c: c.m.allocate(), INPUT),
    Row("alloc-tokens-and-hashes", OFF, lambda c: c.m.allocate(T8, block_hashes=[b"a"]), INPUT),
    Row("alloc-generator", OFF, lambda c: c.m.allocate(gen(T8)), TYPE),
    Row("alloc-set", OFF, lambda c: c.m.allocate(set(T8)), TYPE),
    Row("alloc-bool-tokens", OFF, lambda c: c.m.allocate([True] * 4), TYPE),
    Row("alloc-negative-token", OFF, lambda c: c.m.allocate([-1] * 4), INPUT),
    Row(
        "alloc-hash-unhashable", OFF, lambda c: c.m.allocate(block_hashes=[[1]], num_tokens=4), TYPE
    ),
    Row("alloc-hash-none", OFF, lambda c: c.m.allocate(block_hashes=[None], num_tokens=4), CALLER),
    Row(
        "alloc-hashes-bytes", OFF, lambda c: c.m.allocate(block_hashes=b"abcd", num_tokens=16), TYPE
    ),
    Row(
        "alloc-hashes-too-many",
        OFF,
        lambda c: c.m.allocate(block_hashes=[b"a"] * 3, num_tokens=4),
        INPUT,
    ),
    Row("alloc-metadata-int", OFF, lambda c: c.m.allocate(list(range(300, 308)), metadata=5), TYPE),
    Row("alloc-num-float", OFF, lambda c: c.m.allocate(num_tokens=1.5), TYPE),
    Row("alloc-num-zero", OFF, lambda c: c.m.allocate(num_tokens=0), INPUT),
    Row("alloc-num-huge", OFF, lambda c: c.m.allocate(num_tokens=10**6), KVBudgetExceededError),
    Row("alloc-too-long", OFF, lambda c: c.m.allocate(list(range(64))), KVBudgetExceededError),
    Row("alloc-num-np-ok", OFF, lambda c: c.m.allocate(num_tokens=np.int64(4)), None),
    Row("cache-freed", OFF, lambda c: c.m.cache_blocks(c.dead), KVDoubleFreeError),
    Row("cache-not-handle", OFF, lambda c: c.m.cache_blocks("h"), TYPE),
    Row("cache-num-negative", OFF, lambda c: c.m.cache_blocks(c.h, num_tokens=-4), INPUT),
    Row("free-freed", OFF, lambda c: c.m.free(c.dead), KVDoubleFreeError),
    Row("free-none", OFF, lambda c: c.m.free(None), TYPE),
    Row("free-other-pool", OFF, lambda c: c.m.free(c.alien), KVInvalidHandleError),
    Row("evict-zero", OFF, lambda c: c.m.evict(0), INPUT),
    Row("evict-float", OFF, lambda c: c.m.evict(1.5), TYPE),
    Row(
        "invalidate-unhashable-2nd",
        OFF,
        lambda c: c.m.invalidate([c.h.block_hashes[0], ["x"]]),
        TYPE,
    ),
    Row("invalidate-none", OFF, lambda c: c.m.invalidate(None), TYPE),
    Row("invalidate-int", OFF, lambda c: c.m.invalidate(5), TYPE),
    Row("read-block-unhashable", OFF, lambda c: c.m.read_block([1]), TYPE),
    Row("read-block-unknown", OFF, lambda c: c.m.read_block(b"nope"), KVCacheMissError),
    Row("lookup-unhashable", OFF, lambda c: c.m.lookup([b"a", [1]]), TYPE),
    Row("lookup-none", OFF, lambda c: c.m.lookup(None), TYPE),
    Row("where-unhashable", OFF, lambda c: c.m.where([1]), TYPE),
    Row(
        "bad-write-policy",
        NEW,
        lambda c: KVOffloadManager.from_capacities(GPU4, write_policy="x"),
        CONFIG,
    ),
    Row(
        "admit-negative",
        NEW,
        lambda c: KVOffloadManager.from_capacities(GPU4, admit_after_hits=-1),
        CONFIG,
    ),
    Row(
        "admit-float",
        NEW,
        lambda c: KVOffloadManager.from_capacities(GPU4, admit_after_hits=1.5),
        CONFIG,
    ),
    Row(
        "duplicate-tiers",
        NEW,
        lambda c: KVOffloadManager(
            KVPool(num_blocks=4), [TierConfig("gpu", 4)], device_tier_name="gpu"
        ),
        CONFIG,
    ),
    Row("tier-zero-blocks", NEW, lambda c: TierConfig("cpu", 0), CONFIG),
    Row("tier-float-blocks", NEW, lambda c: TierConfig("cpu", 2.5), CONFIG),
    Row("tier-bad-kind", NEW, lambda c: TierConfig("cpu", 4, kind="tape"), CONFIG),
    Row(
        "device-zero", NEW, lambda c: KVOffloadManager.from_capacities({"gpu": 0}), (CONFIG, INPUT)
    ),
    Row(
        "disk-without-dir",
        NEW,
        lambda c: KVOffloadManager.from_capacities({"gpu": 4, "disk": 4}, model_shape=SHAPE),
        CONFIG,
    ),
]


# -- DiskBlockStore ------------------------------------------------------------------------------
NB = 64


def make_disk(tmp_path, *, delete=None, corrupt=None, unlock=False) -> types.SimpleNamespace:
    d = tmp_path / "kv"
    s = DiskBlockStore(d, "g", NB, fsync=False)
    for k in (b"k1", b"k2"):
        s.write(k, bytes(range(NB)))
    if delete:
        os.unlink(s.path_of(delete))
    if corrupt:
        raw = bytearray(s.path_of(corrupt).read_bytes())
        raw[-1] ^= 0xFF
        s.path_of(corrupt).write_bytes(bytes(raw))
    if unlock:
        (d / ".lock").unlink(missing_ok=True)  # the store may lock the directory itself
    return types.SimpleNamespace(s=s, d=d)


def _disk_ep(name, **kw):
    return EntryPoint(
        name,
        lambda t: make_disk(t, **kw),
        lambda c: (snap_dir(c.d), sorted(c.s.keys())),
        close=lambda c: c.s.close(),
    )


DISK = _disk_ep("DiskBlockStore")
DISK_DEL = _disk_ep("DiskBlockStore.deleted", delete=b"k1")
DISK_BAD = _disk_ep("DiskBlockStore.corrupt", corrupt=b"k1")
DISK_UNLOCKED = _disk_ep("DiskBlockStore.unlocked", unlock=True)
NEW = new("DiskBlockStore")
PAYLOAD = bytes(NB)

# fmt: off
ROWS += [
    Row("write-short", DISK, lambda c: c.s.write(b"k3", bytes(NB - 1)), INPUT),
    Row("write-long", DISK, lambda c: c.s.write(b"k3", bytes(NB + 1)), INPUT),
    Row("write-str-payload", DISK, lambda c: c.s.write(b"k3", "x" * NB), TYPE),
    Row("write-none-payload", DISK, lambda c: c.s.write(b"k3", None), TYPE),
    Row("write-list-key", DISK, lambda c: c.s.write([1], PAYLOAD), CALLER),
    Row("write-float-key", DISK, lambda c: c.s.write(1.5, PAYLOAD), CALLER),
    Row("write-none-key", DISK, lambda c: c.s.write(None, PAYLOAD), CALLER),
    Row("write-np-payload-ok", DISK, lambda c: c.s.write(b"k3", np.zeros(NB, np.uint8)), None),
    Row("read-unknown", DISK, lambda c: c.s.read(b"nope"), MISSING),
    Row("read-list-key", DISK, lambda c: c.s.read([1]), CALLER),
    Row("read-deleted", DISK_DEL, lambda c: c.s.read(b"k1"), MISSING),
    Row("read-corrupt", DISK_BAD, lambda c: c.s.read(b"k1"), KVChecksumMismatchError),
    Row("second-store", DISK, lambda c: DiskBlockStore(c.d, "g", NB), KVStorageLockedError),
    Row("second-store-lock-deleted", DISK_UNLOCKED, lambda c: DiskBlockStore(c.d, "g", NB), KVStorageLockedError),
    Row("nbytes-zero", NEW, lambda c: DiskBlockStore(_tmpdir(), "g", 0), (CONFIG, INPUT)),
    Row("nbytes-negative", NEW, lambda c: DiskBlockStore(_tmpdir(), "g", -1), (CONFIG, INPUT)),
    Row("nbytes-float", NEW, lambda c: DiskBlockStore(_tmpdir(), "g", 1.5), (CONFIG, TYPE)),
    Row("dir-is-a-file", NEW, lambda c: DiskBlockStore(_tmpfile(), "g", NB), (KVStorageError, CONFIG)),
]
# fmt: on


def _tmpdir():
    import tempfile

    return tempfile.mkdtemp()


def _tmpfile():
    import tempfile

    fd, path = tempfile.mkstemp()
    os.close(fd)
    return path


# -- KVTransferEngine (in-process backend) -------------------------------------------------------
def make_transfer(tmp_path) -> types.SimpleNamespace:
    src = KVPool(num_blocks=16, block_size=BS, model_shape=SHAPE)
    dst = KVPool(num_blocks=16, block_size=BS, model_shape=SHAPE)
    eng = KVTransferEngine("inprocess")
    eng.register_pool(src, rank=0)
    eng.register_pool(dst, rank=1)
    h, _ = src.alloc_with_prefix(T8)
    src.write_kv(h, kv(8))
    src.cache_blocks(h)
    eng.transfer_kv_handle(h, 0, 1)  # one record
    dead = src.alloc(4)
    src.free(dead)
    return types.SimpleNamespace(
        eng=eng, src=src, dst=dst, h=h, dead=dead, theirs=dst.alloc(4), meta=KVPool(num_blocks=4)
    )


XFER = EntryPoint(
    "KVTransferEngine",
    make_transfer,
    lambda c: (c.eng.get_metrics(), c.eng.transfer_ids(), snap_pool(c.src), snap_pool(c.dst)),
    lambda c: (c.src.check_invariants(), c.dst.check_invariants()),
    lambda c: c.eng.close(),
)
NEW = new("KVTransferEngine")
BLOCKS2 = torch.zeros(2, 2, 2, BS, 2, 4).half()

# fmt: off
ROWS += [
    Row("send-not-handle", XFER, lambda c: c.eng.transfer_kv_handle("h", 0, 1), TYPE),
    Row("send-none", XFER, lambda c: c.eng.transfer_kv_handle(None, 0, 1), TYPE),
    Row("send-nothing", XFER, lambda c: c.eng.transfer_kv_handles([], 0, 1), INPUT),
    Row("send-handles-generator", XFER, lambda c: c.eng.transfer_kv_handles(gen([c.h]), 0, 1), TYPE),
    Row("send-freed", XFER, lambda c: c.eng.transfer_kv_handle(c.dead, 0, 1), KVInvalidHandleError),
    Row("send-other-pools", XFER, lambda c: c.eng.transfer_kv_handle(c.theirs, 0, 1), KVInvalidHandleError),
    Row("src-unregistered", XFER, lambda c: c.eng.transfer_kv_handle(c.h, 5, 1), CONFIG),
    Row("dst-unregistered", XFER, lambda c: c.eng.transfer_kv_handle(c.h, 0, 5), CONFIG),
    Row("src-rank-str", XFER, lambda c: c.eng.transfer_kv_handle(c.h, "0", 1), (TYPE, CONFIG)),
    Row("dst-rank-bool", XFER, lambda c: c.eng.transfer_kv_handle(c.h, 0, True), TYPE),
    Row("tensors-count", XFER, lambda c: c.eng.transfer_kv_handles([c.h], 0, 1, tensors=[BLOCKS2, BLOCKS2]), INPUT),
    Row("tensor-list", XFER, lambda c: c.eng.transfer_kv_handle(c.h, 0, 1, tensor=[[0]]), TYPE),
    Row("tensor-shape", XFER, lambda c: c.eng.transfer_kv_handle(c.h, 0, 1, tensor=torch.zeros(2, 2, 3)), INPUT),
    Row("tensor-dtype", XFER, lambda c: c.eng.transfer_kv_handle(c.h, 0, 1, tensor=BLOCKS2.float()), (INPUT, TYPE)),
    Row("status-unknown", XFER, lambda c: c.eng.get_transfer_status(999), INPUT),
    Row("metadata-str", XFER, lambda c: c.eng.get_transfer_metadata("1"), (INPUT, TYPE)),
    Row("register-metadata-only", XFER, lambda c: c.eng.register_pool(c.meta, 2), CONFIG),
    Row("register-no-rank", XFER, lambda c: c.eng.register_pool(c.src), CONFIG),
    Row("register-not-pool", XFER, lambda c: c.eng.register_pool("pool", 2), TYPE),
    Row("register-rank-float", XFER, lambda c: c.eng.register_pool(c.src, 2.5), TYPE),
    Row("register-rank-negative", XFER, lambda c: c.eng.register_pool(c.src, -1), (INPUT, CONFIG)),
    Row("receive-inprocess", XFER, lambda c: c.eng.receive(), CONFIG),
    Row("timeout-zero", NEW, lambda c: KVTransferEngine("inprocess", timeout_s=0), CONFIG),
    Row("retries-negative", NEW, lambda c: KVTransferEngine("inprocess", max_retries=-1), CONFIG),
    Row("compression-lz4", NEW, lambda c: KVTransferEngine("inprocess", compression="lz4"), CONFIG),
    Row("chunk-zero", NEW, lambda c: KVTransferEngine("inprocess", chunk_bytes=0), CONFIG),
    Row("chunk-str", NEW, lambda c: KVTransferEngine("inprocess", chunk_bytes="1M"), CONFIG),
    Row("backoff-none", NEW, lambda c: KVTransferEngine("inprocess", retry_backoff_ms=None), CONFIG),
    Row("unknown-backend", NEW, lambda c: KVTransferEngine("carrier-pigeon"), CONFIG),
]
# fmt: on


# -- trace readers -------------------------------------------------------------------------------
MC = '{"timestamp": %s, "input_length": %s, "output_length": %s, "hash_ids": %s}'
GOOD_MC = MC % (0, 512, 1, "[1]")
BL = '{"chat_id": %s, "parent_chat_id": -1, "timestamp": %s, "input_length": 16, "output_length": 1, "type": "text", "turn": 1, "hash_ids": [%s]}'
TK = '{"request_id": %s, "timestamp": %s, "tokens": [1, 2, 3, 4]}'
AZ = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,48,10\n"
BG = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n0.0,ChatGPT,16,3,19,API log\n"


def _reader_ep(name: str, content: bytes, suffix: str) -> EntryPoint:
    def make(tmp_path):
        p = tmp_path / f"trace{suffix}"
        p.write_bytes(content)
        return p

    return EntryPoint(f"read.{name}", make, lambda p: snap_dir(p.parent))


def _lines(*lines: str, tail: bytes = b"") -> bytes:
    return ("\n".join(lines) + "\n").encode() + tail


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


# fmt: off
BAD_UTF8 = {
    "mooncake": (_lines(GOOD_MC) + b'{"timestamp": 1, "x": "\xff"}\n', ".jsonl"),
    "bailian": (_lines(BL % (1, 0, 1)) + b'{"chat_id": "\xff"}\n', ".jsonl"),
    "tokens": (_lines(TK % ('"a"', 0)) + b'{"request_id": "\xff"}\n', ".jsonl"),
    "azure": (AZ.encode() + b"2023-11-16 18:17:04.0,\xff,1\n", ".csv"),
    "burstgpt": (BG.encode() + b"1.0,Chat\xff,1,1,2,API log\n", ".csv"),
}
# fmt: on
READERS = [  # the bad line is line 2 of a JSONL file, line 3 of a CSV (after its header)
    (
        f"utf8-{fmt}",
        _reader_ep(f"utf8-{fmt}", data, sfx),
        fmt,
        FMT,
        r":3\b" if sfx == ".csv" else r":2\b",
    )
    for fmt, (data, sfx) in BAD_UTF8.items()
]
DEEP = (
    '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": '
    + "[" * 100_000
    + "]" * 100_000
    + "}"
)
# fmt: off
READERS += [
    ("gz-truncated", _reader_ep("gz-truncated", _gz(_lines(*[GOOD_MC] * 200))[:-30], ".jsonl.gz"), "auto", FMT, r"trace\.jsonl\.gz"),
    ("gz-garbage", _reader_ep("gz-garbage", b"\x1f\x8b\x08\x00garbage" * 10, ".jsonl.gz"), "mooncake", FMT, r"trace\.jsonl\.gz"),
    ("deep-json", _reader_ep("deep-json", _lines(GOOD_MC, DEEP), ".jsonl"), "mooncake", FMT, r":2\b"),
    ("timestamp-401-digits", _reader_ep("ts401", _lines(GOOD_MC, MC % ("9" * 401, 512, 1, "[1]")), ".jsonl"), "mooncake", FMT, r":2\b"),
    ("output-2**64", _reader_ep("out2**64", _lines(GOOD_MC, MC % (1, 512, 2**64, "[1]")), ".jsonl"), "mooncake", FMT, r":2\b"),
    ("csv-unbalanced-quote", _reader_ep("quote", (AZ + '"2023-11-16 18:17:05.0,5,5\n2023-11-16 18:17:06.0,5,5\n').encode(), ".csv"), "azure", FMT, r":3\b"),
    ("tokens-duplicate-id", _reader_ep("dup-tokens", _lines(TK % (7, 0), TK % ('"7"', 1)), ".jsonl"), "tokens", FMT, r":2\b"),
    ("bailian-duplicate-id", _reader_ep("dup-bailian", _lines(BL % (7, 0, 1), BL % ('"7"', 1, 2)), ".jsonl"), "bailian", FMT, r":2\b"),
    ("azure-context-10**12", _reader_ep("az-huge", (AZ + f"2023-11-16 18:17:05.0,{10**12},5\n").encode(), ".csv"), "azure", FMT, r":3\b"),
    ("burstgpt-request-10**12", _reader_ep("bg-huge", (BG + f"1.0,ChatGPT,{10**12},1,2,API log\n").encode(), ".csv"), "burstgpt", FMT, r":3\b"),
    ("mooncake-input-10**12", _reader_ep("mc-huge", _lines(GOOD_MC, MC % (1, 10**12, 1, "[1]")), ".jsonl"), "mooncake", FMT, r":2\b"),
    ("unknown-format", _reader_ep("fmt", _lines(GOOD_MC), ".jsonl"), "nope", FMT, None),
    ("format-int", _reader_ep("fmt-int", _lines(GOOD_MC), ".jsonl"), 5, FMT, None),
    ("undetectable", _reader_ep("undetectable", b"hello\n", ".txt"), "auto", FMT, None),
]
# fmt: on
# fmt: off
ROWS += [Row(rid, ep, (lambda f: lambda p: read_trace(p, f))(fmt), exc, m) for rid, ep, fmt, exc, m in READERS]
OK_MC = _reader_ep("ok", _lines(GOOD_MC), ".jsonl")
ROWS += [
    Row("block-size-zero", OK_MC, lambda p: read_trace(p, "mooncake", block_size=0), CONFIG),
    Row("block-size-float", OK_MC, lambda p: read_trace(p, "mooncake", block_size=1.5), CONFIG),
    Row("block-size-bool", OK_MC, lambda p: read_trace(p, "mooncake", block_size=True), CONFIG),
    Row("unknown-option", OK_MC, lambda p: read_trace(p, "mooncake", seed=1), CONFIG),
    Row("batch-size-zero", OK_MC, lambda p: next(iter_trace_batches(p, batch_size=0)), CONFIG),
    Row("block-size-np-ok", OK_MC, lambda p: read_trace(p, "mooncake", block_size=np.int64(512)), None),
]
# fmt: on


@pytest.mark.parametrize("row", [r.param for r in ROWS])
def test_bad_input(row: Row, tmp_path) -> None:
    run_row(row, tmp_path)


# -- CLI -----------------------------------------------------------------------------------------
TINY = _lines(*[MC % (i * 1000, 1024, 2, f"[{i}, {i + 1}]") for i in range(3)])
# fmt: off
CLI_CASES = [
    # (id, args: {trace}/{tmp}/{file}... are filled in, a pattern the output must contain);
    # ids ending in "-ok" are accepted (exit 0) with a note instead of an error
    ("replay-capacity-1e12-ok", "replay {trace} --capacity 1e12", r"--capacity"),  # clamped, noted
    ("replay-capacity-negative", "replay {trace} --capacity -5", r"--capacity.*positive|positive.*--capacity"),
    ("replay-capacity-fraction", "replay {trace} --capacity 1.5", r"--capacity"),
    ("replay-capacity-word", "replay {trace} --capacity lots", r"--capacity"),
    ("replay-out-unwritable", "replay {trace} --out {file}/sub", r"--out"),
    ("replay-empty-trace", "replay {empty}", r"empty\.jsonl"),
    ("replay-missing-trace", "replay {tmp}/nope.jsonl", r"nope\.jsonl"),
    ("replay-garbage-gz", "replay {gz} --format mooncake", r"bad\.jsonl\.gz"),
    ("replay-bad-utf8", "replay {utf8}", r"utf8\.jsonl:2\b"),
    ("replay-bad-record", "replay {badrec}", r"badrec\.jsonl:2\b"),
    ("replay-tiers-unknown", "replay {trace} --tiers foo=100", r"--tiers.*foo|foo.*--tiers"),
    ("replay-tiers-zero", "replay {trace} --tiers gpu=0", r"--tiers.*gpu|gpu.*--tiers"),
    ("replay-tiers-word", "replay {trace} --tiers gpu=abc", r"--tiers"),
    ("replay-tiers-fraction", "replay {trace} --tiers gpu=1.5", r"--tiers"),
    ("replay-block-size-zero", "replay {trace} --block-size 0", r"--block-size"),
    ("replay-cost-model", "replay {trace} --cost-model foo", r"--cost-model"),
    ("replay-model-shape", "replay {trace} --model-shape nope", r"--model-shape"),
    ("replay-policy", "replay {trace} --policy nope", r"--policy"),
    ("replay-curve-empty", "replay {trace} --curve ,", r"--curve"),
    ("replay-max-num-seqs", "replay {trace} --mode concurrent --max-num-seqs 0", r"--max-num-seqs"),
    ("sweep-capacities-1e12-ok", "sweep {trace} --capacities 1e12 --executor serial", r"capacit"),
    ("sweep-capacities-negative", "sweep {trace} --capacities -5 --executor serial", r"--capacities"),
    ("sweep-policies", "sweep {trace} --policies nope --executor serial", r"--policies"),
    ("sweep-workers-zero", "sweep {trace} --workers 0", r"--workers"),
    ("sweep-missing-trace", "sweep {tmp}/nope.jsonl", r"nope\.jsonl"),
    ("sweep-empty-trace", "sweep {empty} --executor serial", r"empty\.jsonl"),
    ("sweep-out-unwritable", "sweep {trace} --executor serial --out {file}/sub", r"--out"),
    ("visualize-missing-input", "visualize --input {tmp}/nope.json", r"nope\.json"),
    ("visualize-garbage-input", "visualize --input {garbage}", r"garbage\.json"),
    ("visualize-bad-type", "visualize --input {garbage} --type nope", r"--type"),
    ("demo-negative-accesses", "demo --num-accesses -1 --output {tmp}/d.json", r"--num-accesses"),
    ("demo-zero-block-size", "demo --block-size 0 --output {tmp}/d.json", r"--block-size"),
]
# fmt: on


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_mistake(case, tmp_path) -> None:
    import re

    _, args, pattern = case
    files = {
        "trace": ("tiny.jsonl", TINY),
        "empty": ("empty.jsonl", b""),
        "gz": ("bad.jsonl.gz", b"\x1f\x8b\x08\x00garbage"),
        "utf8": ("utf8.jsonl", _lines(GOOD_MC) + b'{"timestamp": "\xff"}\n'),
        "badrec": ("badrec.jsonl", _lines(GOOD_MC, MC % (1, -5, 1, "[1]"))),
        "garbage": ("garbage.json", b'{"events": [1, 2'),
        "file": ("plain-file", b"x"),
    }
    fill = {"tmp": str(tmp_path)}
    for key, (name, data) in files.items():
        (tmp_path / name).write_bytes(data)
        fill[key] = str(tmp_path / name)
    argv = [a.format(**fill) for a in args.split()]
    if argv[0] in ("replay", "sweep"):
        argv += ["--no-progress"]
        if "--out" not in argv:
            argv += ["--out", str(tmp_path / "out")]
    res = CliRunner().invoke(cli, argv)
    out = res.output
    ok = case[0].endswith("-ok")
    assert (res.exit_code == 0) if ok else (res.exit_code not in (0, None)), out
    assert "Traceback" not in out and "Aborted!" not in out, out
    assert not isinstance(res.exception, MemoryError | RecursionError), out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert re.search(pattern, out), out


def test_row_ids_are_unique():
    ids = [f"{r.ep.name}-{r.id}" for r in ROWS]
    assert len(ids) == len(set(ids))


def test_reader_payloads_are_what_they_claim():
    """The hostile files are hostile in the intended way (not malformed by accident)."""
    assert json.loads(GOOD_MC)["hash_ids"] == [1]
    assert json.loads(BL % (7, 0, 1))["chat_id"] == 7
    assert DEEP.count("[") == 100_000
