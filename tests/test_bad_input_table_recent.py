"""Bad input on the public entry points that landed with issue 12: one row per case.

Same contract as ``test_bad_input_table.py`` (typed error, its ``code``, the
snapshot unchanged, ``check_invariants()`` before and after): the pool's
admission queries and ``register_blocks``/``estimate_bytes``, ``sim.simulate``,
the capacity grammar, model shapes, the socket and comm-adapter transfer
backends, the offload manager's seed methods, ``sim.analysis`` run loading and
reports, the engine-log and chat trace readers, the ``convert``, ``report`` and
``listen`` commands, and (issue 14) placement through the seed's import paths
and the fleet replay. Rows that record a defect in a file owned elsewhere are
``xfail(strict=True)`` with the owner and a one-line repro in the reason.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from sagellm_kv_cache.errors import (
    KVConfigError,
    KVHandleNotFoundError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVTraceFormatError,
    KVTransferFailedError,
)
from sagellm_kv_cache.model_shapes import resolve_model_shape
from sagellm_kv_cache.pool import KVPool
from sim.capacity import resolve_capacity
from tests._snapshots import EntryPoint, Row, run_row, snap_offload
from tests.test_bad_input_table import POOL, TTLPOOL
from tests.test_bad_input_table_io import OFF, TINY, _lines, _reader_ep
from traces import read_trace

pytestmark = pytest.mark.timeout(120)

TYPE, INPUT, CONFIG, FMT = (
    KVInvalidTypeError,
    KVInvalidInputError,
    KVConfigError,
    KVTraceFormatError,
)
CALLER = (KVInvalidInputError, KVInvalidTypeError)
HANDLE = (KVInvalidHandleError, KVInvalidInputError, KVInvalidTypeError)


def new(name: str) -> EntryPoint:
    """Calls with nothing to snapshot (constructors, pure functions)."""
    return EntryPoint(f"{name}.new", lambda t: None)


def gen(xs):
    return (x for x in xs)


# -- KVPool: admission queries, register_blocks, estimate_bytes ----------------------------------
# fmt: off
ROWS = [
    Row("peek-admission-str", POOL, lambda c: c.p.peek_admission("2"), TYPE),
    Row("peek-admission-bool", POOL, lambda c: c.p.peek_admission(True), TYPE),
    Row("peek-admission-float", POOL, lambda c: c.p.peek_admission(2.0), TYPE),
    Row("peek-admission-none", POOL, lambda c: c.p.peek_admission(None), TYPE),
    Row("peek-admission-negative", POOL, lambda c: c.p.peek_admission(-1), INPUT),
    Row("peek-admission-id-out-of-range", POOL, lambda c: c.p.peek_admission(1, [99]), CALLER),
    Row("peek-admission-id-negative", POOL, lambda c: c.p.peek_admission(1, [-1]), CALLER),
    Row("peek-admission-id-str", POOL, lambda c: c.p.peek_admission(1, ["0"]), CALLER),
    Row("peek-admission-ids-int", POOL, lambda c: c.p.peek_admission(1, 3), CALLER),
    Row("peek-admission-ids-none", POOL, lambda c: c.p.peek_admission(1, None), CALLER),
    Row("peek-admission-id-bool", POOL, lambda c: c.p.peek_admission(1, [True]), CALLER),
    Row("peek-admission-np-ok", POOL, lambda c: c.p.peek_admission(np.int64(1), [np.int64(0)]), None),
    Row("peek-admission-ttl-ok", TTLPOOL, lambda c: c.p.peek_admission(2), None),
    Row("obtainable-id-out-of-range", POOL, lambda c: c.p.obtainable_blocks([8]), CALLER),
    Row("obtainable-id-float", POOL, lambda c: c.p.obtainable_blocks([0.0]), CALLER),
    Row("obtainable-ids-str", POOL, lambda c: c.p.obtainable_blocks("01"), CALLER),
    Row("obtainable-ids-generator", POOL, lambda c: c.p.obtainable_blocks(gen([0])), CALLER),
    Row("obtainable-ids-dict", POOL, lambda c: c.p.obtainable_blocks({0: 1}), CALLER),
    Row("obtainable-ok", POOL, lambda c: c.p.obtainable_blocks(c.h.block_ids), None),
    Row("register-alien-handle", POOL, lambda c: c.p.register_blocks(c.alien, ["a"]), HANDLE),
    Row("register-not-a-handle", POOL, lambda c: c.p.register_blocks("h", ["a"]), HANDLE),
    Row("register-hashes-none", POOL, lambda c: c.p.register_blocks(c.fresh, None), CALLER),
    Row("register-hash-none", POOL, lambda c: c.p.register_blocks(c.fresh, ["a", None]), CALLER),
    Row("register-hash-unhashable", POOL, lambda c: c.p.register_blocks(c.fresh, [["a"]]), CALLER),
    Row("register-hashes-str", POOL, lambda c: c.p.register_blocks(c.fresh, "ab"), CALLER),
    Row("register-too-many", POOL, lambda c: c.p.register_blocks(c.fresh, ["a", "b", "c"]), INPUT),
    Row("register-start-negative", POOL, lambda c: c.p.register_blocks(c.fresh, ["a"], -1), INPUT),
    Row("register-start-beyond", POOL, lambda c: c.p.register_blocks(c.fresh, ["a"], 2), INPUT),
    Row("register-start-bool", POOL, lambda c: c.p.register_blocks(c.fresh, ["a"], True), TYPE),
    Row("register-start-float", POOL, lambda c: c.p.register_blocks(c.fresh, ["a"], 0.0), TYPE),
    Row("register-contradicts-handle", POOL, lambda c: c.p.register_blocks(c.h, ["x", "y"]), INPUT),
]
EST = new("KVPool.estimate_bytes")
ROWS += [
    Row("two-sizes", EST, lambda c: KVPool.estimate_bytes(64, num_blocks=4, model_shape="llama-3-8b"), CONFIG),
    Row("no-size", EST, lambda c: KVPool.estimate_bytes(model_shape="llama-3-8b"), CONFIG),
    Row("zero", EST, lambda c: KVPool.estimate_bytes(0, model_shape="llama-3-8b"), CONFIG),
    Row("negative", EST, lambda c: KVPool.estimate_bytes(-16, model_shape="llama-3-8b"), CONFIG),
    Row("float", EST, lambda c: KVPool.estimate_bytes(1.5, model_shape="llama-3-8b"), CONFIG),
    Row("bool", EST, lambda c: KVPool.estimate_bytes(True, model_shape="llama-3-8b"), CONFIG),
    Row("block-size-zero", EST, lambda c: KVPool.estimate_bytes(64, block_size=0, model_shape="llama-3-8b"), CONFIG),
    Row("bad-shape", EST, lambda c: KVPool.estimate_bytes(64, model_shape="no-such-model"), CONFIG),
    Row("shape-int", EST, lambda c: KVPool.estimate_bytes(64, model_shape=7), CONFIG),
    Row("bytes-without-shape", EST, lambda c: KVPool.estimate_bytes(max_bytes=1 << 20), CONFIG),
]


# -- sim.simulate, the capacity grammar, model shapes --------------------------------------------
def _sim(capacity=100, policy="lru", **kw):
    from sim.simulate import simulate

    return simulate(read_trace().head(20), capacity, policy, **kw)


SIM = new("sim.simulate")
ROWS += [
    Row("capacity-zero", SIM, lambda c: _sim(0), CONFIG),
    Row("capacity-negative", SIM, lambda c: _sim(-5), CONFIG),
    Row("capacity-bool", SIM, lambda c: _sim(True), CONFIG),
    Row("capacity-word", SIM, lambda c: _sim("lots"), CONFIG),
    Row("capacity-float", SIM, lambda c: _sim(1.5), CONFIG),
    Row("capacity-list", SIM, lambda c: _sim([100]), CONFIG),
    Row("capacity-bytes-no-shape", SIM, lambda c: _sim("40GiB"), CONFIG),
    Row("capacity-share-over-100-ok", SIM, lambda c: _sim("150%"), None),
    Row("policy-unknown", SIM, lambda c: _sim(policy="nope"), CONFIG),
    Row("policy-int", SIM, lambda c: _sim(policy=3), CONFIG),
    Row("mode-unknown", SIM, lambda c: _sim(mode="parallel"), CONFIG),
    Row("mode-none", SIM, lambda c: _sim(mode=None), CONFIG),
    Row("max-num-seqs-zero", SIM, lambda c: _sim(mode="concurrent", max_num_seqs=0), CONFIG),
    Row("cost-int", SIM, lambda c: _sim(cost=5), CONFIG),
    Row("block-size-mismatch", SIM, lambda c: _sim(block_size=16), CONFIG),
    Row("table-not-a-table", new("sim.simulate.table"), lambda c: __import__("sim.simulate", fromlist=["x"]).simulate([1, 2], 10), CALLER),
    Row("capacity-np-int-ok", SIM, lambda c: _sim(np.int64(100)), None),
    Row("capacity-share-ok", SIM, lambda c: _sim("10%"), None),
]
CAP = new("sim.capacity.resolve_capacity")
ROWS += [
    Row("word", CAP, lambda c: resolve_capacity("lots", block_size=16), CONFIG),
    Row("negative", CAP, lambda c: resolve_capacity(-3, block_size=16), CONFIG),
    Row("zero", CAP, lambda c: resolve_capacity(0, block_size=16), CONFIG),
    Row("bool", CAP, lambda c: resolve_capacity(True, block_size=16), CONFIG),
    Row("nan", CAP, lambda c: resolve_capacity(float("nan"), block_size=16), CONFIG),
    Row("list", CAP, lambda c: resolve_capacity([1], block_size=16), CONFIG),
    Row("block-size-zero", CAP, lambda c: resolve_capacity(10, block_size=0), CONFIG),
    Row("block-size-bool", CAP, lambda c: resolve_capacity("10", block_size=True), CONFIG),
    Row("bytes-no-shape", CAP, lambda c: resolve_capacity("40GiB", block_size=16), CONFIG),
    Row("bytes-bad-shape", CAP, lambda c: resolve_capacity("40GiB", block_size=16, model_shape="nope"), CONFIG),
    Row("share-no-trace", CAP, lambda c: resolve_capacity("10%", block_size=16), CONFIG),
    Row("share-zero", CAP, lambda c: resolve_capacity("0%", block_size=16, distinct_blocks=100), CONFIG),
    Row("share-under-one-block", CAP, lambda c: resolve_capacity("1%", block_size=16, distinct_blocks=10), CONFIG),
    Row("tokens-under-one-block", CAP, lambda c: resolve_capacity("8t", block_size=16), CONFIG),
    Row("unit-unknown", CAP, lambda c: resolve_capacity("5Qt", block_size=16), CONFIG),
    Row("huge-exponent", CAP, lambda c: resolve_capacity("1e400", block_size=16), CONFIG),
    Row("ok-tokens", CAP, lambda c: resolve_capacity("5.12Mt", block_size=16), None),
]
SHAPES = new("model_shapes.resolve_model_shape")
ROWS += [
    Row("unknown-name", SHAPES, lambda c: resolve_model_shape("no-such-model"), CONFIG),
    Row("int", SHAPES, lambda c: resolve_model_shape(32), CONFIG),
    Row("none", SHAPES, lambda c: resolve_model_shape(None), CONFIG),
    Row("custom-three-fields-ok", SHAPES, lambda c: resolve_model_shape("32,8,128"), None),
    Row("custom-zero-layers", SHAPES, lambda c: resolve_model_shape("0,8,128,bf16"), CONFIG),
    Row("custom-negative", SHAPES, lambda c: resolve_model_shape("32,-8,128,bf16"), CONFIG),
    Row("custom-bad-dtype", SHAPES, lambda c: resolve_model_shape("32,8,128,int3"), CONFIG),
    Row("dict-empty", SHAPES, lambda c: resolve_model_shape({}), CONFIG),
    Row("dict-no-heads", SHAPES, lambda c: resolve_model_shape({"num_hidden_layers": 2}), CONFIG),
    Row("dict-layers-str", SHAPES, lambda c: resolve_model_shape({"num_hidden_layers": "2", "num_attention_heads": 4, "hidden_size": 64}), CONFIG),
    Row("bad-dtype-override", SHAPES, lambda c: resolve_model_shape("llama-3-8b", dtype="int3"), CONFIG),
    Row("missing-config-json", SHAPES, lambda c: resolve_model_shape("/nonexistent/config.json"), CONFIG),
    Row("ok-preset", SHAPES, lambda c: resolve_model_shape("llama-3-8b"), None),
]
# fmt: on


def _hf_config(tmp_path, text: bytes) -> str:
    p = tmp_path / "config.json"
    p.write_bytes(text)
    return str(p)


HF = EntryPoint("model_shapes.hf_config", lambda t: t)
ROWS += [
    Row("garbage", HF, lambda t: resolve_model_shape(_hf_config(t, b"{not json")), CONFIG),
    Row("list", HF, lambda t: resolve_model_shape(_hf_config(t, b"[1, 2]")), CONFIG),
    Row("bad-utf8", HF, lambda t: resolve_model_shape(_hf_config(t, b'{"a": "\xff"}')), CONFIG),
    Row("folder-without-config", HF, lambda t: resolve_model_shape(str(t)), CONFIG),
]


# -- transfer: SocketTransferBackend, CommTransferBackendAdapter ---------------------------------
def _socket(**kw):
    from sagellm_kv_cache import SocketTransferBackend

    return SocketTransferBackend(**{"rank": 0, "world_size": 2, **kw})


SOCK_NEW = new("SocketTransferBackend")
# fmt: off
ROWS += [
    Row("rank-negative", SOCK_NEW, lambda c: _socket(rank=-1), CALLER + (CONFIG,)),
    Row("rank-too-large", SOCK_NEW, lambda c: _socket(rank=2), CALLER + (CONFIG,)),
    Row("rank-str", SOCK_NEW, lambda c: _socket(rank="0"), CALLER + (CONFIG,)),
    Row("rank-bool", SOCK_NEW, lambda c: _socket(rank=True), CALLER + (CONFIG,)),
    Row("world-zero", SOCK_NEW, lambda c: _socket(world_size=0), CALLER + (CONFIG,)),
    Row("endpoints-missing-rank", SOCK_NEW, lambda c: _socket(endpoints={0: ("127.0.0.1", 0)}), CALLER + (CONFIG,)),
    Row("endpoints-list", SOCK_NEW, lambda c: _socket(endpoints=[("127.0.0.1", 0)] * 2), CALLER + (CONFIG,)),
    Row("endpoint-port-str", SOCK_NEW, lambda c: _socket(endpoints={0: ("127.0.0.1", "x"), 1: ("127.0.0.1", 0)}), CALLER + (CONFIG,)),
    Row("endpoint-port-huge", SOCK_NEW, lambda c: _socket(endpoints={0: ("127.0.0.1", 70000), 1: ("127.0.0.1", 0)}), CALLER + (CONFIG,)),
    Row("endpoint-host-int", SOCK_NEW, lambda c: _socket(endpoints={0: (127, 0), 1: ("127.0.0.1", 0)}), CALLER + (CONFIG,)),
    Row("timeout-zero", SOCK_NEW, lambda c: _socket(recv_timeout_s=0), CALLER + (CONFIG,)),
    Row("timeout-nan", SOCK_NEW, lambda c: _socket(recv_timeout_s=float("nan")), CALLER + (CONFIG,)),
    Row("max-message-zero", SOCK_NEW, lambda c: _socket(max_message_bytes=0), CALLER + (CONFIG,)),
    Row("store-rank-out", SOCK_NEW, lambda c: _socket(store_rank=5), CALLER + (CONFIG,)),
]
# fmt: on


def make_socket(tmp_path) -> types.SimpleNamespace:
    """A started rank 0 of a 2-rank loopback group (no peer listening)."""
    b = _socket(recv_timeout_s=1.0)
    b.start()
    return types.SimpleNamespace(b=b)


def _sock_snap(c):
    return {"rank": c.b.rank, "world": c.b.world_size, "seq": dict(c.b._seed_seq)}


SOCK = EntryPoint("SocketTransferBackend", make_socket, _sock_snap, None, lambda c: c.b.close())
# a rank that is no peer is KVTransferFailedError, as every backend's check_peer says
PEER = (*CALLER, CONFIG, KVTransferFailedError)
# fmt: off
ROWS += [
    Row("send-rank-negative", SOCK, lambda c: c.b.send(bytearray(8), -1), PEER),
    Row("send-rank-self", SOCK, lambda c: c.b.send(bytearray(8), 0), PEER),
    Row("send-rank-out", SOCK, lambda c: c.b.send(bytearray(8), 7), PEER),
    Row("send-rank-str", SOCK, lambda c: c.b.send(bytearray(8), "1"), CALLER + (CONFIG,)),
    Row("send-buffer-int", SOCK, lambda c: c.b.send(5, 1), CALLER + (CONFIG,)),
    Row("send-buffer-str", SOCK, lambda c: c.b.send("bytes", 1), CALLER + (CONFIG,)),
    Row("recv-rank-out", SOCK, lambda c: c.b.recv(bytearray(8), 9), PEER),
    Row("recv-rank-bool", SOCK, lambda c: c.b.recv(bytearray(8), True), CALLER + (CONFIG,)),
    Row("recv-buffer-none", SOCK, lambda c: c.b.recv(None, 1), CALLER + (CONFIG,)),
    Row("recv-buffer-bytes", SOCK, lambda c: c.b.recv(b"immutable", 1), CALLER + (CONFIG,)),
]
# fmt: on


class _Comm:
    def send(self, tensor, dst):  # pragma: no cover - never reached by a bad row
        raise AssertionError("send reached")

    def recv(self, tensor, src):  # pragma: no cover
        raise AssertionError("recv reached")

    def get_rank(self):
        return 0


def _adapter(comm=None, **kw):
    from sagellm_kv_cache import CommTransferBackendAdapter

    return CommTransferBackendAdapter(_Comm() if comm is None else (comm or None), **kw)


ADAPT_NEW = new("CommTransferBackendAdapter")
ROWS += [
    Row("comm-none", ADAPT_NEW, lambda c: _adapter(comm=False), CONFIG),
    Row(
        "comm-without-send",
        ADAPT_NEW,
        lambda c: _adapter(comm=types.SimpleNamespace(recv=print, get_rank=int)),
        CONFIG,
    ),
    Row(
        "comm-send-not-callable",
        ADAPT_NEW,
        lambda c: _adapter(comm=types.SimpleNamespace(send=1, recv=print, get_rank=int)),
        CONFIG,
    ),
    Row("interconnect-empty", ADAPT_NEW, lambda c: _adapter(interconnect=""), CONFIG),
    Row("interconnect-int", ADAPT_NEW, lambda c: _adapter(interconnect=3), CONFIG),
]
ADAPT = EntryPoint("CommTransferBackendAdapter", lambda t: types.SimpleNamespace(a=_adapter()))
ROWS += [
    Row("send-rank-negative", ADAPT, lambda c: c.a.send(bytearray(8), -1), CALLER + (CONFIG,)),
    Row("send-rank-str", ADAPT, lambda c: c.a.send(bytearray(8), "1"), CALLER + (CONFIG,)),
    Row("send-buffer-int", ADAPT, lambda c: c.a.send(5, 1), CALLER + (CONFIG,)),
    Row("recv-rank-bool", ADAPT, lambda c: c.a.recv(bytearray(8), True), CALLER + (CONFIG,)),
    Row("recv-buffer-none", ADAPT, lambda c: c.a.recv(None, 1), CALLER + (CONFIG,)),
]


# -- KVOffloadManager seed methods ---------------------------------------------------------------
def _seed_snap(c):
    m = c.m
    return {
        "offload": snap_offload(m),
        "registered": m.registered_count(),
        "offloaded": m.offloaded_count(),
        "seed_stats": m.get_offload_stats(),
    }


def make_seed(tmp_path):
    c = OFF.make(tmp_path)
    c.m.register(c.h)
    return c


SEED = EntryPoint("KVOffloadManager.seed", make_seed, _seed_snap, OFF.invariants, OFF.close)
UNKNOWN = (KVHandleNotFoundError,)
# fmt: off
ROWS += [
    Row("register-twice", SEED, lambda c: c.m.register(c.h), INPUT),
    Row("register-dead", SEED, lambda c: c.m.register(c.dead), HANDLE),
    Row("register-alien", SEED, lambda c: c.m.register(c.alien), HANDLE),
    Row("register-not-a-handle", SEED, lambda c: c.m.register("h"), HANDLE),
    Row("register-device-empty", SEED, lambda c: c.m.register(c.h, device=""), CALLER),
    Row("unregister-unknown", SEED, lambda c: c.m.unregister("nope"), UNKNOWN),
    Row("unregister-int", SEED, lambda c: c.m.unregister(5), TYPE),
    Row("offload-unknown", SEED, lambda c: c.m.offload("nope"), UNKNOWN),
    Row("offload-none", SEED, lambda c: c.m.offload(None), TYPE),
    Row("offload-dst-empty", SEED, lambda c: c.m.offload(c.h.handle_id, dst_device=""), CALLER),
    Row("offload-dst-int", SEED, lambda c: c.m.offload(c.h.handle_id, dst_device=3), CALLER),
    Row("restore-unknown", SEED, lambda c: c.m.restore("nope"), UNKNOWN),
    Row("restore-bytes-id", SEED, lambda c: c.m.restore(b"x"), TYPE),
    Row("offload-to-nvme-unknown", SEED, lambda c: c.m.offload_to_nvme("nope"), UNKNOWN),
    Row("restore-from-nvme-unknown", SEED, lambda c: c.m.restore_from_nvme("nope"), UNKNOWN),
    Row("touch-unknown", SEED, lambda c: c.m.touch("nope"), UNKNOWN),
    Row("info-unknown", SEED, lambda c: c.m.get_handle_info("nope"), UNKNOWN),
    Row("current-device-unknown", SEED, lambda c: c.m.current_device("nope"), UNKNOWN),
    Row("is-offloaded-unknown", SEED, lambda c: c.m.is_offloaded("nope"), UNKNOWN),
    Row("registered-handle-unknown", SEED, lambda c: c.m.registered_handle("nope"), UNKNOWN),
    Row("maybe-offload-ratio-2", SEED, lambda c: c.m.maybe_offload(2.0), CALLER),
    Row("maybe-offload-ratio-str", SEED, lambda c: c.m.maybe_offload("0.5"), CALLER),
    Row("maybe-offload-idle-negative", SEED, lambda c: c.m.maybe_offload_idle(idle_s=-1.0), CALLER),
    Row("maybe-offload-idle-str", SEED, lambda c: c.m.maybe_offload_idle(idle_s="1"), CALLER),
    Row("maybe-cascade-ratio-nan", SEED, lambda c: c.m.maybe_cascade_to_nvme(float("nan")), CALLER),
    Row("info-ok", SEED, lambda c: c.m.get_handle_info(c.h.handle_id), None),
]
# fmt: on


# -- sim.analysis: load_run / write_report -------------------------------------------------------
def make_run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.json").write_bytes(b'{"events": [1, 2')
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "summary.json").write_text(json.dumps([1, 2, 3]))
    return tmp_path


def _snap_tree(t):
    return sorted((p.relative_to(t).as_posix(), p.stat().st_size) for p in t.rglob("*"))


def _load(p, **kw):
    from sim.analysis.runs import load_run

    return load_run(p, **kw)


def _report(paths, out=None):
    from sim.analysis.report import write_report

    return write_report(paths, out)


RUNS = EntryPoint("sim.analysis", make_run_dir, _snap_tree)
# fmt: off
ROWS += [
    Row("load-empty-folder", RUNS, lambda t: _load(t / "empty"), INPUT),
    Row("load-garbage-json", RUNS, lambda t: _load(t / "garbage.json"), FMT),
    Row("load-bad-parquet", RUNS, lambda t: _load(t / "bad.parquet"), FMT),
    Row("load-summary-not-a-dict", RUNS, lambda t: _load(t / "summary.json"), FMT),
    Row("load-format-unknown", RUNS, lambda t: _load(t / "garbage.json", format="nope"), (FMT, CONFIG)),
    Row("load-path-int", RUNS, lambda t: _load(5), CALLER),
    Row("report-no-runs", RUNS, lambda t: _report([]), INPUT),
    Row("report-empty-folder", RUNS, lambda t: _report([t / "empty"], t / "r.html"), INPUT),
    Row("report-garbage", RUNS, lambda t: _report([t / "garbage.json"], t / "r.html"), FMT),
    Row("report-paths-str", RUNS, lambda t: _report(str(t / "garbage.json"), t / "r.html"), CALLER),
]
# fmt: on


def test_load_run_and_report_of_a_missing_path_raise_file_not_found(tmp_path):
    """Documented: a path that does not exist is FileNotFoundError (nothing written)."""
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        _report([tmp_path / "nope"], tmp_path / "r.html")
    assert list(tmp_path.iterdir()) == []


# -- trace readers: vllm, sglang, lmcache, openai-chat -------------------------------------------
V = '{"prompt_token_ids": [1, 2, 3, 4]}'
S = '{"input_ids": [1, 2, 3, 4]}'
L = '{"num_tokens": 4, "chunk_hashes": [1], "chunk_size": 4}'
C = '{"messages": [{"role": "user", "content": "hi"}]}'
DEEP = '{"prompt_token_ids": ' + "[" * 100_000 + "]" * 100_000 + "}"
# fmt: off
READERS = [
    ("vllm-bad-utf8", _lines(V) + b'{"prompt_token_ids": [1], "request_id": "\xff"}\n', "vllm", {}, r":2\b"),
    ("vllm-deep-json", _lines(V, DEEP), "vllm", {}, r":2\b"),
    ("vllm-not-an-object", _lines(V, "[1, 2]"), "vllm", {}, r":2\b"),
    ("vllm-token-float", _lines(V, '{"prompt_token_ids": [1.5]}'), "vllm", {}, r":2\b"),
    ("sglang-bad-utf8", _lines(S) + b'{"input_ids": [1], "rid": "\xff"}\n', "sglang", {}, r":2\b"),
    ("sglang-input-str", _lines(S, '{"input_ids": "1234"}'), "sglang", {}, r":2\b"),
    ("lmcache-num-tokens-negative", _lines(L, '{"num_tokens": -4, "chunk_hashes": [1], "chunk_size": 4}'), "lmcache", {}, r":2\b"),
    ("lmcache-chunk-size-zero", _lines(L, '{"num_tokens": 4, "chunk_hashes": [1], "chunk_size": 0}'), "lmcache", {}, r":2\b"),
    ("lmcache-num-tokens-10**12", _lines(L, '{"num_tokens": 1000000000000, "chunk_hashes": [1], "chunk_size": 4}'), "lmcache", {}, r":2\b"),
    ("chat-messages-str", _lines(C, '{"messages": "hi"}'), "openai-chat", {"tokenizer": "bytes"}, r":2\b"),
    ("chat-content-int", _lines(C, '{"messages": [{"role": "user", "content": 5}]}'), "openai-chat", {"tokenizer": "bytes"}, r":2\b"),
    ("chat-bad-utf8", _lines(C) + b'{"messages": [{"role": "user", "content": "\xff"}]}\n', "openai-chat", {"tokenizer": "bytes"}, r":2\b"),
    ("chat-no-tokenizer", _lines(C), "openai-chat", {}, None),
]
# fmt: on
for rid, data, fmt, opts, pattern in READERS:
    ep = _reader_ep(rid, data, ".jsonl")
    exc = (FMT, CONFIG) if pattern is None else FMT
    ROWS.append(
        Row(rid, ep, (lambda f, o: lambda p: read_trace(p, f, **o))(fmt, opts), exc, pattern)
    )
ROWS.append(
    Row(
        "chat-tokenizer-int",
        _reader_ep("chat-tok", _lines(C), ".jsonl"),
        lambda p: read_trace(p, "openai-chat", tokenizer=3),
        (FMT, CONFIG),
    )
)
ROWS.append(
    Row(
        "vllm-ok", _reader_ep("vllm-ok", _lines(V), ".jsonl"), lambda p: read_trace(p, "vllm"), None
    )
)


# -- placement (through the seed's import paths) and the fleet replay -----------------------------
def make_placement(tmp_path) -> types.SimpleNamespace:
    from sagellm_kv_cache.load_aware_scheduler import LoadAwareScheduler
    from sagellm_kv_cache.load_metrics import LoadMetricsCollector

    col = LoadMetricsCollector()
    col.attach_pool("d0", KVPool(num_blocks=8, block_size=16, metadata_only=True))
    col.register_device("d1", kv_tokens_capacity=128)
    s = LoadAwareScheduler(col, "best_fit")
    s.select_device(["d0", "d1"], 16)
    return types.SimpleNamespace(col=col, s=s)


def _placement_snap(c):  # two devices (d0 fed by a pool), a scheduler that placed once
    metrics = {d: m.to_dict() for d, m in c.col.get_all_metrics().items()}
    return {"metrics": metrics, "stats": c.s.get_placement_stats(), "rng": c.s._rng.getstate()}


PLACE = EntryPoint("placement", make_placement, _placement_snap)
# fmt: off
ROWS += [
    Row("select-no-candidates", PLACE, lambda c: c.s.select_device([]), INPUT),
    Row("select-candidates-str", PLACE, lambda c: c.s.select_device("d0"), TYPE),
    Row("select-candidates-none", PLACE, lambda c: c.s.select_device(None), TYPE),
    Row("select-tokens-float", PLACE, lambda c: c.s.select_device(["d0", "d1"], 1.5), TYPE),
    Row("select-tokens-bool", PLACE, lambda c: c.s.select_device(["d0", "d1"], True), TYPE),
    Row("select-tokens-negative", PLACE, lambda c: c.s.select_device(["d0", "d1"], -1), INPUT),
    Row("select-unregistered", PLACE, lambda c: c.s.select_device(["d0", "d9"], 16), INPUT),
    Row("select-hashes-str", PLACE, lambda c: c.s.select_device(["d0"], 0, block_hashes="ab"), TYPE),
    Row("select-for-request-float", PLACE, lambda c: c.s.select_device_for_request({"num_tokens": 2.5}), TYPE),
    Row("requests-active-negative", PLACE, lambda c: c.col.update_request_count("d1", -1, 0), INPUT),
    Row("requests-queued-negative", PLACE, lambda c: c.col.update_request_count("d1", 0, -2), INPUT),
    Row("requests-active-float", PLACE, lambda c: c.col.update_request_count("d1", 1.5, 0), TYPE),
    Row("requests-unknown-device", PLACE, lambda c: c.col.update_request_count("d9", 1, 0), INPUT),
    Row("metrics-requests-negative", PLACE, lambda c: c.col.get_metrics("d1").update_request_count(-3, 0), INPUT),
    Row("select-np-int-ok", PLACE, lambda c: c.s.select_device(["d0", "d1"], np.int64(16)), None),
]
FLEET = new("sim.simulate.fleet")
ROWS += [
    Row("instances-zero", FLEET, lambda c: _sim(instances=0), CONFIG),
    Row("instances-str", FLEET, lambda c: _sim(instances="x"), CONFIG),
    Row("instances-bool", FLEET, lambda c: _sim(instances=True), CONFIG),
    Row("instances-float", FLEET, lambda c: _sim(instances=2.0), CONFIG),
    Row("router-unknown", FLEET, lambda c: _sim(instances=2, router="nope"), CONFIG),
    Row("router-int", FLEET, lambda c: _sim(instances=2, router=3), CONFIG),
    Row("router-bad-param", FLEET, lambda c: _sim(instances=2, router="kv-aware:weight=x"), CONFIG),
    Row("global-pool-no-shape", FLEET, lambda c: _sim(instances=2, fleet_options={"global_pool": 50}), CONFIG),
    Row("ok", FLEET, lambda c: _sim(instances=2, router="cache-aware"), None),
]
# fmt: on


def test_seed_import_paths_are_the_placement_classes():
    """The seed's modules ``load_metrics`` / ``load_aware_scheduler`` name the placement classes."""
    from sagellm_kv_cache import load_aware_scheduler, load_metrics, placement
    from sagellm_kv_cache.load_aware_scheduler import LoadAwareScheduler, PlacementStrategy
    from sagellm_kv_cache.load_metrics import DeviceLoadMetrics, LoadMetricsCollector

    assert (LoadAwareScheduler, PlacementStrategy, DeviceLoadMetrics, LoadMetricsCollector) == (
        placement.LoadAwareScheduler, placement.PlacementStrategy,
        placement.DeviceLoadMetrics, placement.LoadMetricsCollector,
    )  # fmt: skip
    assert load_aware_scheduler.__all__ == ["LoadAwareScheduler", "PlacementStrategy"]
    assert load_metrics.__all__ == ["DeviceLoadMetrics", "LoadMetricsCollector"]
    assert {"ROUND_ROBIN", "LOWEST_KV", "SHORTEST_QUEUE", "BEST_FIT"} <= set(
        PlacementStrategy.__members__
    )


# -- run ------------------------------------------------------------------------------------------
XFAIL: dict[str, str] = {}


def _param(r: Row):
    rid = f"{r.ep.name}-{r.id}"
    if rid in XFAIL:
        return pytest.param(r, id=rid, marks=pytest.mark.xfail(strict=True, reason=XFAIL[rid]))
    return r.param


@pytest.mark.parametrize("row", [_param(r) for r in ROWS])
def test_bad_input(row: Row, tmp_path) -> None:
    run_row(row, tmp_path)


def test_row_ids_are_unique():
    ids = [f"{r.ep.name}-{r.id}" for r in ROWS]
    assert len(ids) == len(set(ids))
    assert set(XFAIL) <= set(ids)


# -- CLI: convert, report, listen ----------------------------------------------------------------
# fmt: off
CLI_CASES = [
    ("convert-missing-input", "convert {tmp}/nope.jsonl {tmp}/o.parquet", r"nope\.jsonl"),
    ("convert-garbage-input", "convert {garbage} {tmp}/o.parquet --from mooncake", r"garbage\.json"),
    ("convert-no-to", "convert {trace} {tmp}/o.jsonl", r"--to"),
    ("convert-bad-to", "convert {trace} {tmp}/o.jsonl --to nope", r"--to"),
    ("convert-bad-from", "convert {trace} {tmp}/o.parquet --from nope", r"--from"),
    ("convert-block-size-zero", "convert {trace} {tmp}/o.parquet --block-size 0", r"--block-size"),
    ("convert-out-unwritable", "convert {trace} {file}/sub/o.parquet", r"sub|OUT|o\.parquet"),
    ("convert-chat-no-tokenizer", "convert {chat} {tmp}/o.parquet --from openai-chat", r"--tokenizer|tokenizer"),
    ("convert-bad-line", "convert {badrec} {tmp}/o.parquet", r"badrec\.jsonl:2\b"),
    ("report-missing-run", "report {tmp}/nope", r"nope"),
    ("report-garbage-run", "report {garbage} --out {tmp}/r.html", r"garbage\.json"),
    ("report-empty-folder", "report {emptydir} --out {tmp}/r.html", r"emptydir|run file"),
    ("report-dpi-low", "report {emptydir} --dpi 1", r"--dpi"),
    ("report-no-args", "report", r"RUN_DIRS"),
    ("listen-no-out", "listen tcp://127.0.0.1:1", r"--out"),
    ("listen-bad-endpoint", "listen nonsense --out {tmp}/rec --duration 0.2", r"ENDPOINT|endpoint|nonsense"),
    ("listen-duration-negative", "listen tcp://127.0.0.1:1 --out {tmp}/rec --duration -1", r"--duration"),
    ("listen-out-is-file", "listen tcp://127.0.0.1:1 --out {file} --duration 0.2", r"--out|plain-file"),
]
# fmt: on
CLI_XFAIL: dict[str, str] = {}


def _cli_param(case):
    if case[0] in CLI_XFAIL:
        return pytest.param(
            case, id=case[0], marks=pytest.mark.xfail(strict=True, reason=CLI_XFAIL[case[0]])
        )
    return pytest.param(case, id=case[0])


@pytest.mark.parametrize("case", [_cli_param(c) for c in CLI_CASES])
def test_cli_mistake(case, tmp_path) -> None:
    import re

    _, args, pattern = case
    files = {
        "trace": ("tiny.jsonl", TINY),
        "garbage": ("garbage.json", b'{"events": [1, 2'),
        "badrec": (
            "badrec.jsonl",
            _lines(
                TINY.decode().splitlines()[0],
                '{"timestamp": 1, "input_length": -5, "output_length": 1, "hash_ids": [1]}',
            ),
        ),
        "chat": ("chat.jsonl", _lines(C)),
        "file": ("plain-file", b"x"),
    }
    fill = {"tmp": str(tmp_path)}
    for key, (name, data) in files.items():
        (tmp_path / name).write_bytes(data)
        fill[key] = str(tmp_path / name)
    (tmp_path / "emptydir").mkdir()
    fill["emptydir"] = str(tmp_path / "emptydir")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(**fill) for a in args.split()]
    res = CliRunner().invoke(cli, argv)
    out = res.output
    assert res.exit_code not in (0, None), out
    assert "Traceback" not in out and "Aborted!" not in out, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert re.search(pattern, out), out
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a failed command left files"


def test_cli_cases_are_unique():
    ids = [c[0] for c in CLI_CASES]
    assert len(ids) == len(set(ids)) and set(CLI_XFAIL) <= set(ids)
