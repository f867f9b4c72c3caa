"""Bad input on the in-memory public entry points: one row per case.

Every row builds a fresh object, snapshots it (stats + structure, see
``tests/_snapshots.py``), makes one bad call and asserts the typed error, its
``code`` and that the snapshot is unchanged; ``check_invariants()`` holds
before and after. Rows with ``exc=None`` are inputs that must be accepted
(numpy integers where an int is asked for, ...). The disk, transfer, reader
and CLI rows are in ``test_bad_input_table_io.py``.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from sagellm_kv_cache import AccessStatsCollector, EvictionManager, PrefixCache
from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.errors import (
    KVBlockImmutableError,
    KVBudgetExceededError,
    KVCacheMissError,
    KVConfigError,
    KVDoubleFreeError,
    KVHandlePinnedError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVInvalidTypeError,
    KVNoVictimError,
    KVPoolFullError,
    KVPrefixTooLongError,
    KVRefCountUnderflowError,
    KVTraceFormatError,
)
from sagellm_kv_cache.handle import KVHandle
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.scheduler import SchedRequest, SchedulerBridge
from sagellm_kv_cache.storage import KVStorage, ModelShape
from tests._snapshots import (
    EntryPoint,
    Row,
    run_row,
    snap_block_pool,
    snap_collector,
    snap_pool,
    snap_prefix_cache,
    snap_scheduler,
    snap_storage,
)

pytestmark = pytest.mark.timeout(60)

SHAPE = ModelShape(2, 2, 4, "float16")
BS = 4
T8 = list(range(100, 108))  # two full blocks
TYPE, INPUT, CONFIG = KVInvalidTypeError, KVInvalidInputError, KVConfigError
CALLER = (KVInvalidInputError, KVInvalidTypeError)  # either caller-mistake error is right


def gen(xs):
    return (x for x in xs)


def kv(n: int, value: float = 1.0, dtype=torch.float16) -> torch.Tensor:
    return torch.full((SHAPE.num_layers, 2, n, SHAPE.num_kv_heads, SHAPE.head_dim), value).to(dtype)


# -- KVPool --------------------------------------------------------------------------------------
def make_pool_ctx(tmp_path=None, *, tensors=False, policy="lru") -> types.SimpleNamespace:
    """8 blocks of 4: a live cached handle ``h`` (2 blocks), a freed cached prompt
    (2 evictable blocks), a freed handle ``dead``, a live, uncached, pinned handle
    ``fresh`` (2 blocks), with tensors a second handle ``hit`` on ``h``'s cached blocks, and a
    handle of another pool ``alien``."""
    kw = {"model_shape": SHAPE} if tensors else {}
    p = KVPool(num_blocks=8, block_size=BS, eviction_policy=policy, **kw)
    h, _ = p.alloc_with_prefix(T8)
    if tensors:
        p.write_kv(h, kv(8))
    p.cache_blocks(h)
    old, _ = p.alloc_with_prefix(list(range(200, 208)))
    p.cache_blocks(old)
    p.free(old)
    dead = p.alloc(4)
    p.free(dead)
    fresh = p.alloc(8)  # held, not cached, pinned
    p.pin(fresh)
    hit = None
    if tensors:
        hit, n = p.alloc_with_prefix(T8)  # shares h's cached blocks
        assert n == 8
    other = KVPool(num_blocks=8, block_size=BS, **kw)
    alien = other.alloc(4)
    return types.SimpleNamespace(
        p=p, h=h, dead=dead, fresh=fresh, hit=hit, alien=alien, other=other
    )


def _pool_snap(c):
    return snap_pool(c.p)


def _pool_inv(c):
    c.p.check_invariants()


POOL = EntryPoint("KVPool", make_pool_ctx, _pool_snap, _pool_inv)
TPOOL = EntryPoint("KVPool.kv", lambda t: make_pool_ctx(tensors=True), _pool_snap, _pool_inv)
TTLPOOL = EntryPoint("KVPool.ttl", lambda t: make_pool_ctx(policy="ttl"), _pool_snap, _pool_inv)


def new(name: str) -> EntryPoint:
    """Constructor rows: nothing to snapshot."""
    return EntryPoint(f"{name}.new", lambda t: None)


NEW = new("KVPool")


def _meta_tokens():
    return torch.empty(8, dtype=torch.long, device="meta")


# fmt: off
ROWS = [
    # alloc
    Row("alloc-str", POOL, lambda c: c.p.alloc("4"), TYPE),
    Row("alloc-float", POOL, lambda c: c.p.alloc(4.0), TYPE),
    Row("alloc-bool", POOL, lambda c: c.p.alloc(True), TYPE),
    Row("alloc-none", POOL, lambda c: c.p.alloc(None), TYPE),
    Row("alloc-zero", POOL, lambda c: c.p.alloc(0), INPUT),
    Row("alloc-negative", POOL, lambda c: c.p.alloc(-1), INPUT),
    Row("alloc-too-large", POOL, lambda c: c.p.alloc(10**6), KVBudgetExceededError),
    Row("alloc-huge", POOL, lambda c: c.p.alloc(2**70), KVBudgetExceededError),
    Row("alloc-no-room-now", POOL, lambda c: c.p.alloc(7 * BS), KVPoolFullError),
    Row("alloc-metadata-int", POOL, lambda c: c.p.alloc(4, metadata=5), TYPE),
    Row("alloc-metadata-list", POOL, lambda c: c.p.alloc(4, metadata=[1, 2]), TYPE),
    Row("alloc-bad-device", POOL, lambda c: c.p.alloc(4, device="tpu"), CONFIG),
    Row("alloc-bad-dtype", POOL, lambda c: c.p.alloc(4, dtype="int3"), CONFIG),
    Row("alloc-bad-layout", POOL, lambda c: c.p.alloc(4, layout="XYZ"), CONFIG),
    Row("alloc-np-int64-ok", POOL, lambda c: c.p.alloc(np.int64(4)), None),
    Row("alloc-np-int32-ok", POOL, lambda c: c.p.alloc(np.int32(5)), None),
    # alloc_with_prefix: tokens
    Row("awp-generator", POOL, lambda c: c.p.alloc_with_prefix(gen(T8)), TYPE),
    Row("awp-set", POOL, lambda c: c.p.alloc_with_prefix(set(T8)), TYPE),
    Row("awp-dict", POOL, lambda c: c.p.alloc_with_prefix(dict.fromkeys(T8)), TYPE),
    Row("awp-str", POOL, lambda c: c.p.alloc_with_prefix("abcdefgh"), TYPE),
    Row("awp-bytes", POOL, lambda c: c.p.alloc_with_prefix(b"abcdefgh"), TYPE),
    Row("awp-int", POOL, lambda c: c.p.alloc_with_prefix(8), TYPE),
    Row("awp-bool-tokens", POOL, lambda c: c.p.alloc_with_prefix([True] * 4), TYPE),
    Row("awp-float-tokens", POOL, lambda c: c.p.alloc_with_prefix([1.5] * 4), TYPE),
    Row("awp-str-tokens", POOL, lambda c: c.p.alloc_with_prefix(["a"] * 4), TYPE),
    Row("awp-none-token", POOL, lambda c: c.p.alloc_with_prefix([1, None, 3, 4]), TYPE),
    Row("awp-negative-token", POOL, lambda c: c.p.alloc_with_prefix([-1, 2, 3, 4]), INPUT),
    Row("awp-token-2**63", POOL, lambda c: c.p.alloc_with_prefix([2**63, 2, 3, 4]), INPUT),
    Row("awp-empty", POOL, lambda c: c.p.alloc_with_prefix([]), INPUT),
    Row("awp-meta-tensor", POOL, lambda c: c.p.alloc_with_prefix(_meta_tokens()), CALLER),
    Row("awp-float-tensor", POOL, lambda c: c.p.alloc_with_prefix(torch.ones(8)), TYPE),
    Row("awp-2d-array", POOL, lambda c: c.p.alloc_with_prefix(np.ones((2, 4), int)), CALLER),
    Row("awp-too-long", POOL, lambda c: c.p.alloc_with_prefix(list(range(64))), KVBudgetExceededError),
    Row("awp-tokens-and-hashes", POOL, lambda c: c.p.alloc_with_prefix(T8, block_hashes=[b"a"]), INPUT),
    Row("awp-num-tokens-mismatch", POOL, lambda c: c.p.alloc_with_prefix(T8, num_tokens=5), INPUT),
    Row("awp-metadata-int", POOL, lambda c: c.p.alloc_with_prefix(T8, metadata=5), TYPE),
    Row("awp-nothing", POOL, lambda c: c.p.alloc_with_prefix(), INPUT),
    Row("awp-np-array-ok", POOL, lambda c: c.p.alloc_with_prefix(np.arange(8)), None),
    Row("awp-tensor-ok", POOL, lambda c: c.p.alloc_with_prefix(torch.arange(8)), None),
    Row("awp-np-int-tokens-ok", POOL, lambda c: c.p.alloc_with_prefix([np.int64(t) for t in T8]), None),
    Row("awp-tuple-ok", POOL, lambda c: c.p.alloc_with_prefix(tuple(T8)), None),
    # alloc_with_prefix: block hashes
    Row("awp-hashes-no-num-tokens", POOL, lambda c: c.p.alloc_with_prefix(block_hashes=[b"a"]), INPUT),
    Row("awp-hash-unhashable", POOL, lambda c: c.p.alloc_with_prefix(block_hashes=[[1]], num_tokens=4), TYPE),
    Row("awp-hash-none", POOL, lambda c: c.p.alloc_with_prefix(block_hashes=[None], num_tokens=4), CALLER),
    Row("awp-hashes-bytes", POOL, lambda c: c.p.alloc_with_prefix(block_hashes=b"ab", num_tokens=8), TYPE),
    Row("awp-hashes-generator", POOL, lambda c: c.p.alloc_with_prefix(block_hashes=gen([b"a"]), num_tokens=4), TYPE),
    Row("awp-hashes-too-many", POOL, lambda c: c.p.alloc_with_prefix(block_hashes=[b"a"] * 5, num_tokens=4), INPUT),
    Row("awp-hashes-too-few", POOL, lambda c: c.p.alloc_with_prefix(block_hashes=[], num_tokens=8), INPUT),
    Row("awp-num-tokens-float", POOL, lambda c: c.p.alloc_with_prefix(block_hashes=[b"a"], num_tokens=4.0), TYPE),
    Row("awp-num-tokens-np-ok", POOL, lambda c: c.p.alloc_with_prefix(block_hashes=[b"a"], num_tokens=np.int64(4)), None),
    # cache_blocks
    Row("cache-hash-none", POOL, lambda c: c.p.cache_blocks(c.fresh, block_hashes=[None]), CALLER),
    Row("cache-hash-unhashable-2nd", POOL, lambda c: c.p.cache_blocks(c.fresh, block_hashes=[b"a", ["x"]]), TYPE),
    Row("cache-hashes-too-many", POOL, lambda c: c.p.cache_blocks(c.h, block_hashes=[b"a"] * 3), INPUT),
    Row("cache-hashes-str", POOL, lambda c: c.p.cache_blocks(c.h, block_hashes="ab"), TYPE),
    Row("cache-num-tokens-negative", POOL, lambda c: c.p.cache_blocks(c.h, num_tokens=-4), INPUT),
    Row("cache-num-tokens-float", POOL, lambda c: c.p.cache_blocks(c.h, num_tokens=4.5), TYPE),
    Row("cache-num-tokens-bool", POOL, lambda c: c.p.cache_blocks(c.h, num_tokens=True), TYPE),
    Row("cache-num-tokens-too-many", POOL, lambda c: c.p.cache_blocks(c.h, num_tokens=64), INPUT),
    Row("cache-tokens-generator", POOL, lambda c: c.p.cache_blocks(c.h, tokens=gen(T8)), TYPE),
    Row("cache-not-a-handle", POOL, lambda c: c.p.cache_blocks("h"), TYPE),
    Row("cache-freed", POOL, lambda c: c.p.cache_blocks(c.dead), KVDoubleFreeError),
    Row("cache-other-pool", POOL, lambda c: c.p.cache_blocks(c.alien), KVInvalidHandleError),
    # register_blocks (KV copied in from another tier / node)
    Row("register-not-a-handle", POOL, lambda c: c.p.register_blocks("h", [b"a"]), TYPE),
    Row("register-freed", POOL, lambda c: c.p.register_blocks(c.dead, [b"a"]), KVDoubleFreeError),
    Row("register-other-pool", POOL, lambda c: c.p.register_blocks(c.alien, [b"a"]), KVInvalidHandleError),
    Row("register-hash-none", POOL, lambda c: c.p.register_blocks(c.fresh, [b"a", None]), INPUT),
    Row("register-hash-unhashable", POOL, lambda c: c.p.register_blocks(c.fresh, [b"a", ["x"]]), TYPE),
    Row("register-hashes-str", POOL, lambda c: c.p.register_blocks(c.fresh, "ab"), TYPE),
    Row("register-hashes-generator", POOL, lambda c: c.p.register_blocks(c.fresh, gen([b"a"])), TYPE),
    Row("register-hashes-too-many", POOL, lambda c: c.p.register_blocks(c.fresh, [b"a", b"b", b"c"]), INPUT),
    Row("register-start-negative", POOL, lambda c: c.p.register_blocks(c.fresh, [b"a"], -1), INPUT),
    Row("register-start-float", POOL, lambda c: c.p.register_blocks(c.fresh, [b"a"], 0.0), TYPE),
    Row("register-start-bool", POOL, lambda c: c.p.register_blocks(c.fresh, [b"a"], True), TYPE),
    Row("register-start-beyond", POOL, lambda c: c.p.register_blocks(c.fresh, [b"a"], 2), INPUT),
    Row("register-contradicts-handle", POOL, lambda c: c.p.register_blocks(c.h, [b"x", b"y"], 0), INPUT, match="differ"),
    Row("register-beyond-handle-hashes", POOL, lambda c: c.p.register_blocks(c.h, [*c.h.block_hashes, b"z"]), INPUT),
    Row("register-np-start-ok", POOL, lambda c: c.p.register_blocks(c.h, c.h.block_hashes, np.int64(2)), None),
    # free / pin / unpin
    Row("free-twice", POOL, lambda c: c.p.free(c.dead), KVDoubleFreeError),
    Row("free-other-pool", POOL, lambda c: c.p.free(c.alien), KVInvalidHandleError),
    Row("free-none", POOL, lambda c: c.p.free(None), TYPE),
    Row("free-handle-id", POOL, lambda c: c.p.free(c.h.handle_id), TYPE),
    Row("free-forged-handle", POOL, lambda c: c.p.free(KVHandle(8, list(c.h.block_ids), pool_id=c.p.pool_id)), KVInvalidHandleError),
    Row("free-pinned", POOL, lambda c: c.p.free(c.fresh), KVHandlePinnedError),
    Row("pin-freed", POOL, lambda c: c.p.pin(c.dead), KVDoubleFreeError),
    Row("pin-other-pool", POOL, lambda c: c.p.pin(c.alien), KVInvalidHandleError),
    Row("unpin-unpinned", POOL, lambda c: c.p.unpin(c.h), KVRefCountUnderflowError),
    Row("get-handle-unknown", POOL, lambda c: c.p.get_handle("nope"), KVInvalidHandleError),
    Row("get-handle-unhashable", POOL, lambda c: c.p.get_handle(["x"]), CALLER),
    # lookups, eviction, invalidation, budget
    Row("match-nothing", POOL, lambda c: c.p.match_prefix(), INPUT),
    Row("match-unhashable", POOL, lambda c: c.p.match_prefix(block_hashes=[[1]]), TYPE),
    Row("match-generator", POOL, lambda c: c.p.match_prefix(gen(T8)), TYPE),
    Row("match-hashes-str", POOL, lambda c: c.p.match_prefix(block_hashes="ab"), TYPE),
    Row("evict-zero", POOL, lambda c: c.p.evict(0), INPUT),
    Row("evict-negative", POOL, lambda c: c.p.evict(-1), INPUT),
    Row("evict-float", POOL, lambda c: c.p.evict(1.5), TYPE),
    Row("evict-str", POOL, lambda c: c.p.evict("1"), TYPE),
    Row("evict-np-ok", POOL, lambda c: c.p.evict(np.int64(1)), None),
    Row("invalidate-unhashable-2nd", POOL, lambda c: c.p.invalidate([c.h.block_hashes[0], ["x"]]), TYPE),
    Row("invalidate-none", POOL, lambda c: c.p.invalidate(None), TYPE),
    Row("invalidate-int", POOL, lambda c: c.p.invalidate(5), TYPE),
    Row("invalidate-bytes", POOL, lambda c: c.p.invalidate(c.h.block_hashes[0]), TYPE),
    Row("can-admit-zero", POOL, lambda c: c.p.can_admit(0), INPUT),
    Row("can-admit-str", POOL, lambda c: c.p.can_admit("4"), TYPE),
    Row("write-kv-metadata-only", POOL, lambda c: c.p.write_kv(c.h, kv(8)), CONFIG),
    Row("read-kv-metadata-only", POOL, lambda c: c.p.read_kv(c.h), CONFIG),
    Row("set-retention-lru", POOL, lambda c: c.p.set_retention(c.h, 50), CONFIG),
    Row("pin-prefix-lru", POOL, lambda c: c.p.pin_prefix(c.h, 10.0), CONFIG),
    Row("pin-prefix-negative", TTLPOOL, lambda c: c.p.pin_prefix(c.h, -5.0), INPUT),
    Row("pin-prefix-str", TTLPOOL, lambda c: c.p.pin_prefix(c.h, "10"), CALLER),
    Row("pin-prefix-uncached", TTLPOOL, lambda c: c.p.pin_prefix(c.fresh, 10.0), INPUT),
    Row("pin-prefix-freed", TTLPOOL, lambda c: c.p.pin_prefix(c.dead, 10.0), KVDoubleFreeError),
    # KV data
    Row("write-kv-list", TPOOL, lambda c: c.p.write_kv(c.fresh, [[0.0]]), TYPE),
    Row("write-kv-bad-shape", TPOOL, lambda c: c.p.write_kv(c.fresh, torch.zeros(2, 2, 8, 2)), INPUT),
    Row("write-kv-bad-dtype", TPOOL, lambda c: c.p.write_kv(c.fresh, kv(8, dtype=torch.float32)), TYPE),
    Row("write-kv-start-float", TPOOL, lambda c: c.p.write_kv(c.fresh, kv(4), start_token=1.5), TYPE),
    Row("write-kv-start-bool", TPOOL, lambda c: c.p.write_kv(c.fresh, kv(4), start_token=True), TYPE),
    Row("write-kv-start-str", TPOOL, lambda c: c.p.write_kv(c.fresh, kv(4), start_token="0"), TYPE),
    Row("write-kv-start-negative", TPOOL, lambda c: c.p.write_kv(c.fresh, kv(4), start_token=-1), INPUT),
    Row("write-kv-too-long", TPOOL, lambda c: c.p.write_kv(c.fresh, kv(12)), INPUT),
    Row("write-kv-empty", TPOOL, lambda c: c.p.write_kv(c.fresh, kv(0)), INPUT),
    Row("write-kv-freed", TPOOL, lambda c: c.p.write_kv(c.dead, kv(4)), KVDoubleFreeError),
    Row("write-kv-cached-owner", TPOOL, lambda c: c.p.write_kv(c.h, kv(8, 0.0)), KVBlockImmutableError),
    Row("write-kv-into-hit", TPOOL, lambda c: c.p.write_kv(c.hit, kv(8, 0.0)), KVBlockImmutableError),
    Row("write-kv-start-np-ok", TPOOL, lambda c: c.p.write_kv(c.fresh, kv(4), start_token=np.int64(4)), None),
    Row("read-kv-zero", TPOOL, lambda c: c.p.read_kv(c.h, num_tokens=0), INPUT),
    Row("read-kv-too-many", TPOOL, lambda c: c.p.read_kv(c.h, num_tokens=100), INPUT),
    Row("read-kv-num-float", TPOOL, lambda c: c.p.read_kv(c.h, num_tokens=1.5), TYPE),
    Row("read-kv-start-str", TPOOL, lambda c: c.p.read_kv(c.h, start_token="1"), TYPE),
    Row("read-kv-start-negative", TPOOL, lambda c: c.p.read_kv(c.h, num_tokens=2, start_token=-1), INPUT),
    Row("copy-float-id", TPOOL, lambda c: c.p.copy_blocks([1.5], [7]), TYPE),
    Row("copy-bool-id", TPOOL, lambda c: c.p.copy_blocks([True], [7]), TYPE),
    Row("copy-str-id", TPOOL, lambda c: c.p.copy_blocks(["0"], [7]), TYPE),
    Row("copy-none", TPOOL, lambda c: c.p.copy_blocks(None, None), TYPE),
    Row("copy-length-mismatch", TPOOL, lambda c: c.p.copy_blocks([0], [6, 7]), INPUT),
    Row("copy-out-of-range", TPOOL, lambda c: c.p.copy_blocks([0], [99]), INPUT),
    Row("copy-negative", TPOOL, lambda c: c.p.copy_blocks([0], [-1]), INPUT),
    Row("copy-into-cached", TPOOL, lambda c: c.p.copy_blocks([6], [c.h.block_ids[0]]), KVBlockImmutableError),
    Row("copy-into-evictable", TPOOL, lambda c: c.p.copy_blocks([6], [c.p.policy.peek_victims(1)[0]]), KVBlockImmutableError),
    # constructor
    Row("num-blocks-2**40", NEW, lambda c: KVPool(num_blocks=2**40), CONFIG),
    Row("num-blocks-float", NEW, lambda c: KVPool(num_blocks=4.0), TYPE),
    Row("max-tokens-str", NEW, lambda c: KVPool("16"), TYPE),
    Row("no-size", NEW, lambda c: KVPool(), CONFIG),
    Row("two-sizes", NEW, lambda c: KVPool(16, num_blocks=4), CONFIG),
    Row("block-size-zero", NEW, lambda c: KVPool(num_blocks=4, block_size=0), CONFIG),
    Row("block-size-bool", NEW, lambda c: KVPool(num_blocks=4, block_size=True), CONFIG),
    Row("max-tokens-below-block", NEW, lambda c: KVPool(3, block_size=4), CONFIG),
    Row("unknown-policy", NEW, lambda c: KVPool(num_blocks=4, eviction_policy="nope"), CONFIG),
    Row("unknown-device", NEW, lambda c: KVPool(num_blocks=4, device="tpu"), CONFIG),
    Row("unknown-hash-fn", NEW, lambda c: KVPool(num_blocks=4, hash_fn="md5"), CONFIG),
    Row("unknown-layout", NEW, lambda c: KVPool(num_blocks=4, layout="XYZ"), CONFIG),
    Row("unknown-model-shape", NEW, lambda c: KVPool(num_blocks=4, model_shape="nope"), CONFIG),
    Row("max-bytes-no-shape", NEW, lambda c: KVPool(max_bytes=1 << 20), CONFIG),
    Row("tensors-without-shape", NEW, lambda c: KVPool(num_blocks=4, metadata_only=False), CONFIG),
    Row("num-blocks-np-ok", NEW, lambda c: KVPool(num_blocks=np.int64(4)), None),
]
# fmt: on


# -- BlockPool (the mechanism under every pool) -------------------------------------------------
NEW = new("BlockPool")


def make_bp(tmp_path=None) -> BlockPool:
    """4 blocks: 0 held (cached b"a"), 1 evictable (cached b"b"), 2 held, 3 free."""
    bp = BlockPool(4, BS)
    ids = bp.allocate(3)
    bp.cache_blocks(ids, [b"a", b"b"])
    bp.release([1])
    return bp


BP = EntryPoint("BlockPool", make_bp, snap_block_pool, lambda bp: bp.check_invariants())

# fmt: off
ROWS += [
    Row("zero", NEW, lambda c: BlockPool(0), INPUT),
    Row("float", NEW, lambda c: BlockPool(2.5), TYPE),
    Row("str", NEW, lambda c: BlockPool("4"), TYPE),
    Row("bad-policy", NEW, lambda c: BlockPool(4, policy="nope"), CONFIG),
    Row("allocate-negative", BP, lambda bp: bp.allocate(-1), INPUT),
    Row("allocate-float", BP, lambda bp: bp.allocate(1.5), TYPE),
    Row("allocate-too-many", BP, lambda bp: bp.allocate(5), KVPoolFullError),
    Row("release-out-of-range", BP, lambda bp: bp.release([99]), INPUT),
    Row("release-free-block", BP, lambda bp: bp.release([3]), KVRefCountUnderflowError),
    Row("release-free-then-held", BP, lambda bp: bp.release([3, 0]), KVRefCountUnderflowError),
    Row("cache-hash-none", BP, lambda bp: bp.cache_blocks([2], [None]), CALLER),
    Row("cache-hash-unhashable", BP, lambda bp: bp.cache_blocks([2], [["x"]]), TYPE),
    Row("cache-more-hashes-than-blocks", BP, lambda bp: bp.cache_blocks([2], [b"c", b"d"]), INPUT),
    Row("cache-free-block", BP, lambda bp: bp.cache_blocks([3], [b"c"]), INPUT),
    Row("pin-out-of-range", BP, lambda bp: bp.pin([99]), INPUT),
    Row("pin-free-block", BP, lambda bp: bp.pin([3]), INPUT),
    Row("unpin-unpinned", BP, lambda bp: bp.unpin([0]), KVRefCountUnderflowError),
    Row("touch-free-block", BP, lambda bp: bp.touch([3]), INPUT),
    Row("evict-negative", BP, lambda bp: bp.evict(-1), INPUT),
    Row("evict-str", BP, lambda bp: bp.evict("1"), TYPE),
    Row("match-unhashable", BP, lambda bp: bp.match_prefix([[1]]), TYPE),
    Row("uncache-out-of-range", BP, lambda bp: bp.uncache(99), INPUT),
]
# fmt: on


# -- PrefixCache ---------------------------------------------------------------------------------
NEW = new("PrefixCache")


def make_pc(tmp_path=None) -> PrefixCache:
    pc = PrefixCache(block_size=BS, max_cached_blocks=4)
    pc.insert([b"a", b"b"], [10, 11], handle_id="h1")
    return pc


PC = EntryPoint("PrefixCache", make_pc, snap_prefix_cache)
PCB = EntryPoint(
    "PrefixCache.pool",
    lambda t: make_pool_ctx(),
    lambda c: snap_pool(c.p),
    _pool_inv,
)

# fmt: off
ROWS += [
    Row("lookup-none", PC, lambda pc: pc.lookup(None), TYPE),
    Row("lookup-str", PC, lambda pc: pc.lookup("ab"), TYPE),
    Row("lookup-unhashable", PC, lambda pc: pc.lookup([b"a", [1]]), TYPE),
    Row("lookup-generator", PC, lambda pc: pc.lookup(gen([b"a"])), TYPE),
    Row("lookup-num-tokens-negative", PC, lambda pc: pc.lookup([b"a"], num_tokens=-1), INPUT),
    Row("lookup-num-tokens-str", PC, lambda pc: pc.lookup([b"a"], num_tokens="4"), TYPE),
    Row("lookup-np-num-tokens-ok", PC, lambda pc: pc.lookup([b"a"], num_tokens=np.int64(4)), None),
    Row("insert-length-mismatch", PC, lambda pc: pc.insert([b"c"], [1, 2]), INPUT),
    Row("insert-too-long", PC, lambda pc: pc.insert([bytes([i]) for i in range(5)], list(range(5))), KVPrefixTooLongError),
    Row("insert-unhashable", PC, lambda pc: pc.insert([b"c", [1]], [1, 2]), TYPE),
    Row("insert-hash-none", PC, lambda pc: pc.insert([b"c", None], [1, 2]), CALLER),
    Row("insert-blocks-int", PC, lambda pc: pc.insert([b"c"], 5), TYPE),
    Row("insert-set", PC, lambda pc: pc.insert({b"c"}, [1]), TYPE),
    Row("evict-negative", PC, lambda pc: pc.evict_by_count(-1), INPUT),
    Row("evict-float", PC, lambda pc: pc.evict_by_count(1.5), TYPE),
    Row("hash-short-block", PC, lambda pc: pc.compute_block_hash([1, 2, 3]), INPUT),
    Row("hash-str-tokens", PC, lambda pc: pc.compute_block_hash(["a"] * 4), TYPE),
    Row("hashes-generator", PC, lambda pc: pc.compute_block_hashes(gen(T8)), TYPE),
    Row("hashes-str", PC, lambda pc: pc.compute_block_hashes("abcdefgh"), TYPE),
    Row("block-size-zero", NEW, lambda c: PrefixCache(block_size=0), INPUT),
    Row("capacity-zero", NEW, lambda c: PrefixCache(max_cached_blocks=0), INPUT),
    Row("bad-policy", NEW, lambda c: PrefixCache(eviction_policy="nope"), CONFIG),
    Row("insert-hash-none", PCB, lambda c: PrefixCache(pool=c.p).insert([None], [c.fresh.block_ids[0]]), CALLER),
    Row("insert-free-block", PCB, lambda c: PrefixCache(pool=c.p).insert([b"z"], [c.p.block_pool.free_queue[0]]), INPUT),
    Row("insert-out-of-range", PCB, lambda c: PrefixCache(pool=c.p).insert([b"z"], [99]), INPUT),
    Row("insert-float-id", PCB, lambda c: PrefixCache(pool=c.p).insert([b"z"], [1.5]), CALLER),
    Row("insert-bool-id", PCB, lambda c: PrefixCache(pool=c.p).insert([b"z"], [True]), CALLER),
    Row("insert-unhashable-2nd", PCB, lambda c: PrefixCache(pool=c.p).insert([b"y", [1]], c.fresh.block_ids), TYPE),
]
# fmt: on


# -- KVStorage -----------------------------------------------------------------------------------
NEW = new("KVStorage")


def make_storage(tmp_path=None) -> KVStorage:
    s = KVStorage(4, BS, SHAPE)
    s.write_tokens([0, 1, 2, 3], kv(16, 1.0))
    return s


ST = EntryPoint("KVStorage", make_storage, snap_storage)
BLOCK = (SHAPE.num_layers, 2, 1, BS, SHAPE.num_kv_heads, SHAPE.head_dim)

# fmt: off
ROWS += [
    Row("write-blocks-bad-shape", ST, lambda s: s.write_blocks([0], torch.zeros(2, 2, 2)), INPUT),
    Row("write-blocks-out-of-range", ST, lambda s: s.write_blocks([9], torch.zeros(BLOCK).half()), INPUT),
    Row("write-blocks-negative", ST, lambda s: s.write_blocks([-1], torch.zeros(BLOCK).half()), INPUT),
    Row("write-blocks-float-id", ST, lambda s: s.write_blocks([1.5], torch.zeros(BLOCK).half()), TYPE),
    Row("write-blocks-dtype", ST, lambda s: s.write_blocks([0], torch.zeros(BLOCK)), TYPE),
    Row("write-blocks-list", ST, lambda s: s.write_blocks([0], [0.0]), TYPE),
    Row("read-blocks-out-of-range", ST, lambda s: s.read_blocks([99]), INPUT),
    Row("read-blocks-str-id", ST, lambda s: s.read_blocks(["0"]), TYPE),
    Row("copy-length-mismatch", ST, lambda s: s.copy_blocks([0], [1, 2]), INPUT),
    Row("copy-out-of-range", ST, lambda s: s.copy_blocks([0], [9]), INPUT),
    Row("write-tokens-list", ST, lambda s: s.write_tokens([0], [[0]]), TYPE),
    Row("write-tokens-bad-shape", ST, lambda s: s.write_tokens([0], torch.zeros(2, 2, 4)), INPUT),
    Row("write-tokens-start-negative", ST, lambda s: s.write_tokens([0, 1], kv(4), start_token=-1), INPUT),
    Row("write-tokens-past-blocks", ST, lambda s: s.write_tokens([0], kv(8)), INPUT),
    Row("read-tokens-zero", ST, lambda s: s.read_tokens([0], 0), INPUT),
    Row("read-tokens-past-blocks", ST, lambda s: s.read_tokens([0], 100), INPUT),
    Row("bad-device", NEW, lambda c: KVStorage(4, BS, SHAPE, device="tpu"), CONFIG),
    Row("bad-layout", NEW, lambda c: KVStorage(4, BS, SHAPE, layout="XYZ"), CONFIG),
    Row("negative-blocks", NEW, lambda c: KVStorage(-1, BS, SHAPE), CALLER + (CONFIG,)),
    Row("float-blocks", NEW, lambda c: KVStorage(2.5, BS, SHAPE), (TYPE, CONFIG)),
    Row("shape-zero-layers", NEW, lambda c: ModelShape(0, 2, 4), CONFIG),
    Row("shape-bad-dtype", NEW, lambda c: ModelShape(1, 2, 4, "int3"), CONFIG),
]
# fmt: on


# -- EvictionManager -----------------------------------------------------------------------------
NEW = new("EvictionManager")


def make_em(tmp_path=None) -> types.SimpleNamespace:
    hs = [KVHandle(8, [i], ref_count=0, last_access_at=1.0 + i) for i in range(3)]
    bad = KVHandle(8, [9], ref_count=0, metadata={"priority": "high"})
    return types.SimpleNamespace(em=EvictionManager("lru", clock=lambda: 10.0), hs=hs, bad=bad)


EM = EntryPoint(
    "EvictionManager",
    make_em,
    lambda c: (c.em.get_stats(), c.em.policy_name, [(h.handle_id, dict(h.metadata)) for h in c.hs]),
)

# fmt: off
ROWS += [
    Row("unknown-policy", NEW, lambda c: EvictionManager("nope"), CONFIG),
    Row("ttl-zero", NEW, lambda c: EvictionManager(ttl_seconds=0), CONFIG),
    Row("ttl-str", NEW, lambda c: EvictionManager(ttl_seconds="1"), CONFIG),
    Row("priority-101", NEW, lambda c: EvictionManager(default_priority=101), CONFIG),
    Row("priority-bool", NEW, lambda c: EvictionManager(default_priority=True), CONFIG),
    Row("need-negative", EM, lambda c: c.em.select_victims(c.hs, -1), INPUT),
    Row("need-float", EM, lambda c: c.em.select_victims(c.hs, 1.5), INPUT),
    Row("need-bool", EM, lambda c: c.em.select_victims(c.hs, True), INPUT),
    Row("max-victims-negative", EM, lambda c: c.em.select_victims(c.hs, 1, max_victims=-1), INPUT),
    Row("handles-none", EM, lambda c: c.em.select_victims(None, 1), INPUT),
    Row("handles-one-handle", EM, lambda c: c.em.select_victims(c.hs[0], 1), INPUT),
    Row("handles-twice", EM, lambda c: c.em.select_victims([c.hs[0], c.hs[0]], 1), INPUT),
    Row("handles-strings", EM, lambda c: c.em.select_victims(["x"], 1), INPUT),
    Row("need-too-much", EM, lambda c: c.em.select_victims(c.hs, 10**9), KVNoVictimError),
    Row("priority-str", EM, lambda c: c.em.order([*c.hs, c.bad]), INPUT),
    Row("order-int", EM, lambda c: c.em.order(5), INPUT),
    Row("set-policy-unknown", EM, lambda c: c.em.set_policy("nope"), CONFIG),
    Row("need-np-ok", EM, lambda c: c.em.select_victims(c.hs, np.int64(8)), None),
]
# fmt: on


# -- AccessStatsCollector ------------------------------------------------------------------------
NEW = new("AccessStatsCollector")


def make_collector(tmp_path=None) -> AccessStatsCollector:
    c = AccessStatsCollector(clock=lambda: 0.0)
    c.record_access("b1", True, timestamp=1.0, request_id="r1", position=0, tier="gpu")
    c.record_prompt(["b1", "b2"], 1, timestamp=2.0, request_id="r2")
    c.record_eviction("b2", timestamp=3.0)
    return c


COL = EntryPoint("AccessStatsCollector", make_collector, snap_collector)

# fmt: off
ROWS += [
    Row("access-unhashable-id", COL, lambda c: c.record_access([1], True), TYPE),
    Row("access-none-id", COL, lambda c: c.record_access(None, True), TYPE),
    Row("access-timestamp-str", COL, lambda c: c.record_access("b", timestamp="x"), TYPE),
    Row("access-position-float", COL, lambda c: c.record_access("b", position=1.5), TYPE),
    Row("access-position-2**70", COL, lambda c: c.record_access("b", position=2**70), INPUT),
    Row("access-size-str", COL, lambda c: c.record_access("b", size_bytes="x"), TYPE),
    Row("access-request-unhashable", COL, lambda c: c.record_access("b", request_id=[1]), TYPE),
    Row("many-length-mismatch", COL, lambda c: c.record_many(["a", "b"], [True]), INPUT),
    Row("many-ids-int", COL, lambda c: c.record_many(5, True), TYPE),
    Row("many-positions-str", COL, lambda c: c.record_many(["a"], True, positions=["x"]), TYPE),
    Row("prompt-hits-str", COL, lambda c: c.record_prompt(["a"], "x", timestamp=0.0), TYPE),
    Row("prompt-hits-too-many", COL, lambda c: c.record_prompt(["a"], 5, timestamp=0.0), INPUT),
    Row("prompt-hits-negative", COL, lambda c: c.record_prompt(["a"], -1, timestamp=0.0), INPUT),
    Row("prompt-timestamp-none", COL, lambda c: c.record_prompt(["a"], 1, timestamp=None), TYPE),
    Row("prompt-ids-generator", COL, lambda c: c.record_prompt(gen(["a"]), 0, timestamp=0.0), TYPE),
    Row("eviction-unhashable", COL, lambda c: c.record_eviction([1]), TYPE),
    Row("evictions-hashes-mismatch", COL, lambda c: c.record_evictions(["a", "b"], block_hashes=[1]), INPUT),
    Row("window-zero", NEW, lambda c: AccessStatsCollector(time_windows={"w": 0}), INPUT),
    Row("window-str", NEW, lambda c: AccessStatsCollector(time_windows={"w": "x"}), TYPE),
    Row("load-garbage", NEW, lambda c: AccessStatsCollector.load(_garbage_json()), (KVTraceFormatError, INPUT)),
    Row("access-np-position-ok", COL, lambda c: c.record_access("b", position=np.int64(3)), None),
]
# fmt: on


def _garbage_json():
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        fh.write('{"events": [1, 2')
    return fh.name


# -- KVCacheManager / SchedulerBridge ------------------------------------------------------------
NEW = new("SchedulerBridge")


def make_bridge(tmp_path=None) -> SchedulerBridge:
    b = SchedulerBridge(32, block_size=BS, host_max_tokens=32)
    b.allocate_request("run", tokens=T8)
    b.allocate_request("done", tokens=list(range(300, 308)))
    b.free_request("done")
    return b


SB = EntryPoint(
    "SchedulerBridge",
    make_bridge,
    snap_scheduler,
    lambda b: b.manager.check_invariants(),
    lambda b: b.close(),
)
R4 = {"request_id": "a", "num_tokens": 4}

# fmt: off
ROWS += [
    Row("alloc-id-int", SB, lambda b: b.allocate_request(5, 4), TYPE),
    Row("alloc-id-running", SB, lambda b: b.allocate_request("run", 4), INPUT),
    Row("alloc-num-float", SB, lambda b: b.allocate_request("a", 1.5), TYPE),
    Row("alloc-num-zero", SB, lambda b: b.allocate_request("a", 0), INPUT),
    Row("alloc-num-huge", SB, lambda b: b.allocate_request("a", 10**6), KVBudgetExceededError),
    Row("alloc-tokens-generator", SB, lambda b: b.allocate_request("a", tokens=gen(T8)), TYPE),
    Row("alloc-tokens-set", SB, lambda b: b.allocate_request("a", tokens=set(T8)), TYPE),
    Row("alloc-tokens-bool", SB, lambda b: b.allocate_request("a", tokens=[True] * 4), TYPE),
    Row("alloc-tokens-negative", SB, lambda b: b.allocate_request("a", tokens=[-1] * 4), INPUT),
    Row("alloc-tokens-num-mismatch", SB, lambda b: b.allocate_request("a", 4, tokens=T8), INPUT),
    Row("alloc-hash-unhashable", SB, lambda b: b.allocate_request("a", 4, block_hashes=[[1]]), TYPE),
    Row("alloc-hash-none", SB, lambda b: b.allocate_request("a", 4, block_hashes=[None]), CALLER),
    Row("alloc-timeout-str", SB, lambda b: b.manager.allocate("a", 4, wait=True, timeout="x"), TYPE),
    Row("alloc-np-num-ok", SB, lambda b: b.allocate_request("a", np.int64(4)), None),
    Row("free-unknown", SB, lambda b: b.free_request("nope"), KVCacheMissError),
    Row("free-unhashable", SB, lambda b: b.free_request(["run"]), TYPE),
    Row("cache-num-negative", SB, lambda b: b.manager.cache("run", -4), INPUT),
    Row("cache-unknown", SB, lambda b: b.manager.cache("nope"), KVCacheMissError),
    Row("handle-unhashable", SB, lambda b: b.manager.get_handle({}), TYPE),
    Row("lookup-nothing", SB, lambda b: b.manager.lookup(), INPUT),
    Row("lookup-unhashable", SB, lambda b: b.manager.lookup(block_hashes=[[1]]), TYPE),
    Row("lookup-generator", SB, lambda b: b.manager.lookup(gen(T8)), TYPE),
    Row("plan-none", SB, lambda b: b.plan(None), TYPE),
    Row("plan-int-item", SB, lambda b: b.plan([5]), TYPE),
    Row("plan-str", SB, lambda b: b.plan("abc"), TYPE),
    Row("plan-missing-field", SB, lambda b: b.plan([{"request_id": "a"}]), INPUT),
    Row("plan-unknown-field", SB, lambda b: b.plan([{**R4, "bogus": 1}]), INPUT),
    Row("plan-id-int", SB, lambda b: b.plan([{**R4, "request_id": 5}]), TYPE),
    Row("plan-num-float", SB, lambda b: b.plan([SchedRequest("a", 1.5)]), TYPE),
    Row("plan-hash-unhashable", SB, lambda b: b.plan([{**R4, "block_hashes": [[1]]}]), TYPE),
    Row("plan-tokens-generator", SB, lambda b: b.plan([{**R4, "tokens": gen(T8)}]), TYPE),
    Row("plan-duplicate-ids", SB, lambda b: b.plan([R4, R4]), INPUT),
    Row("schedule-duplicate-ids", SB, lambda b: b.schedule([R4, R4]), INPUT),
    Row("schedule-running-id", SB, lambda b: b.schedule([R4, {**R4, "request_id": "run"}]), INPUT),
    Row("schedule-tokens-num-mismatch", SB, lambda b: b.schedule([R4, {"request_id": "b", "num_tokens": 4, "tokens": T8}]), INPUT),
    Row("plan-np-num-ok", SB, lambda b: b.plan([{**R4, "num_tokens": np.int64(4)}]), None),
    Row("block-size-zero", NEW, lambda c: SchedulerBridge(64, block_size=0), CONFIG),
    Row("max-tokens-zero", NEW, lambda c: SchedulerBridge(0), INPUT),
    Row("host-tiny", NEW, lambda c: SchedulerBridge(64, block_size=16, host_max_tokens=2), CONFIG),
    Row("host-negative", NEW, lambda c: SchedulerBridge(64, host_max_tokens=-16), INPUT),
    Row("host-float", NEW, lambda c: SchedulerBridge(64, host_max_tokens=16.0), TYPE),
    Row("max-seqs-zero", NEW, lambda c: SchedulerBridge(64, max_num_seqs=0), CONFIG),
    Row("max-seqs-float", NEW, lambda c: SchedulerBridge(64, max_num_seqs=1.5), CONFIG),
    Row("batched-negative", NEW, lambda c: SchedulerBridge(64, max_num_batched_tokens=-1), CONFIG),
    Row("bad-policy", NEW, lambda c: SchedulerBridge(64, eviction_policy="nope"), CONFIG),
    Row("bad-write-policy", NEW, lambda c: SchedulerBridge(64, write_policy="nope"), CONFIG),
]
# fmt: on


@pytest.mark.parametrize("row", [r.param for r in ROWS])
def test_bad_input(row: Row, tmp_path) -> None:
    run_row(row, tmp_path)


def test_row_ids_are_unique():
    ids = [f"{r.ep.name}-{r.id}" for r in ROWS]
    assert len(ids) == len(set(ids))
