"""Batched hook events: what the pool sends, per-block fallback, queued collector records."""

from __future__ import annotations

import random
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.hooks import PoolHook
from sagellm_kv_cache.profiling import AccessStatsCollector
from sagellm_kv_cache.profiling.hook import AccessStatsHook


class Batched(PoolHook):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_blocks_cached(self, block_ids, block_hashes, parent_hash, timestamp):
        self.calls.append(("cached", list(block_ids), list(block_hashes), parent_hash))

    def on_evict_many(self, block_ids, block_hashes, reason, timestamp):
        self.calls.append(("evicted", list(block_ids), list(block_hashes), reason))


class PerBlock(PoolHook):
    """Implements only the per-block methods: PoolHook's defaults fan batches out."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_block_cached(self, block_id, block_hash, parent_hash, timestamp):
        self.calls.append(("cached", block_id, block_hash, parent_hash))

    def on_evict(self, block_id, block_hash, reason, timestamp):
        self.calls.append(("evicted", block_id, block_hash, reason))


class DuckTyped:
    """Not a PoolHook and no batched methods: the pool calls per-block methods."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_block_cached(self, block_id, block_hash, parent_hash, timestamp):
        self.calls.append(("cached", block_id, block_hash, parent_hash))

    def on_evict(self, block_id, block_hash, reason, timestamp):
        self.calls.append(("evicted", block_id, block_hash, reason))


def _drive(hooks) -> BlockPool:
    bp = BlockPool(4, block_size=2, clock=lambda: 1.0)
    bp.hooks.extend(hooks)
    a = bp.allocate(3)  # blocks 0, 1, 2
    assert a == [0, 1, 2]
    bp.cache_blocks(a, ["h0", "h1", "h2"])
    bp.release(a)  # evictable, tail-first: 2, 1, 0
    b = bp.allocate(1)  # block 3 (free)
    # "h1" is already cached (block 1): position 1 is skipped, two runs result
    bp.cache_blocks([b[0], 1, 3], ["x0", "h1", "x2"])  # an odd, hand-made id list
    bp.release(b)
    bp.allocate(4)  # evicts everything in LRU order
    return bp


def test_pool_sends_one_call_per_run_and_batch():
    hook = Batched()
    _drive([hook])
    assert hook.calls == [
        ("cached", [0, 1, 2], ["h0", "h1", "h2"], None),
        ("cached", [3], ["x0"], None),  # position 0; position 2 reuses block 3: not new
        # LRU victims: released tail-first 2, 1, 0, then block 3
        ("evicted", [2, 1, 0, 3], ["h2", "h1", "h0", "x0"], "capacity"),
    ]


def test_runs_split_where_a_hash_was_already_cached():
    hook = Batched()
    bp = BlockPool(8, block_size=2)
    bp.hooks.append(hook)
    first = bp.allocate(1)
    bp.cache_blocks(first, ["b"])
    ids = bp.allocate(4)
    bp.cache_blocks(ids, ["a", "b", "c", "d"])  # "b" is cached on another block
    assert hook.calls[1:] == [
        ("cached", [ids[0]], ["a"], None),
        ("cached", [ids[2], ids[3]], ["c", "d"], "b"),  # parent: the hash before the run
    ]


def test_per_block_hooks_see_the_same_events_in_order():
    batched, per_block, duck = Batched(), PerBlock(), DuckTyped()
    _drive([batched, per_block, duck])
    expanded = []
    for kind, ids, hashes, extra in batched.calls:
        parent = extra
        for b, h in zip(ids, hashes):
            if kind == "cached":
                expanded.append(("cached", b, h, parent))
                parent = h
            else:
                expanded.append(("evicted", b, h, extra))
    assert per_block.calls == expanded
    assert duck.calls == expanded


def test_record_prompt_equals_record_access_rows():
    queued = AccessStatsCollector()
    direct = AccessStatsCollector()
    queued.record_prompt([5, 6, 7], 2, timestamp=3.0, request_id="r", tier="gpu", size_bytes=64)
    queued.record_prompt([5, 9], 0, timestamp=4.0)
    for i, b in enumerate([5, 6, 7]):
        direct.record_access(
            b, i < 2, timestamp=3.0, request_id="r", position=i, tier="gpu", size_bytes=64
        )
    for i, b in enumerate([5, 9]):
        direct.record_access(b, False, timestamp=4.0, position=i)
    assert list(queued.iter_events()) == list(direct.iter_events())
    assert queued.to_polars().equals(direct.to_polars())


def test_queued_and_direct_records_keep_call_order():
    c = AccessStatsCollector()
    c.record_prompt(["a", "b"], 1, timestamp=1.0)
    c.record_evictions(["b"], "capacity", timestamp=1.5, block_hashes=[b"\x01"])
    c.record_access("z", True, timestamp=2.0)  # flushes what was queued first
    c.record_prompt(["c"], 0, timestamp=3.0)
    c.record_eviction("a", "explicit", timestamp=4.0)  # flushes too
    assert [(e.block_id, e.timestamp, e.is_hit) for e in c.iter_events()] == [
        ("a", 1.0, True),
        ("b", 1.0, False),
        ("z", 2.0, True),
        ("c", 3.0, False),
    ]
    assert [(e.block_id, e.reason) for e in c.iter_evictions()] == [
        ("b", "capacity"),
        ("a", "explicit"),
    ]
    assert c.num_evictions == 2
    # block codes follow first appearance: the queued prompt came before "z"
    assert c.to_polars()["block_code"].to_list() == [0, 1, 2, 3]


def test_reset_drops_queued_records():
    c = AccessStatsCollector()
    c.record_prompt([1, 2], 1, timestamp=0.0)
    c.record_evictions([1], timestamp=0.0)
    c.reset()
    assert len(c) == 0 and c.num_evictions == 0


def test_hook_with_many_requests_crosses_the_flush_threshold():
    hook = AccessStatsHook()
    for r in range(5000):
        hook.on_lookup(f"r{r}", [r, r + 1], 1, 2, float(r))
    df = hook.collector.to_polars()
    assert df.height == 10_000
    assert df["block_id"].to_list()[:6] == [0, 1, 1, 2, 2, 3]
    assert df["position"].to_list()[:4] == [0, 1, 0, 1]
    assert df["is_hit"].sum() == 5000


def test_concurrent_record_prompt_loses_nothing():
    c = AccessStatsCollector()

    def work(k: int) -> None:
        for _ in range(3000):
            c.record_prompt([k, k + 100], 1, timestamp=float(k), request_id=f"t{k}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    df = c.to_polars()
    assert df.height == 4 * 3000 * 2
    assert sorted(df.group_by("request_id").len()["len"].to_list()) == [6000] * 4


def test_large_queued_batches_intern_ids_in_first_seen_order():
    rng = random.Random(7)
    queued = AccessStatsCollector()
    direct = AccessStatsCollector()
    for r in range(300):  # > 4096 ids per flush: the vectorised interning path
        ids = [rng.randrange(50_000) for _ in range(rng.randrange(1, 40))]
        hit = rng.randrange(len(ids) + 1)
        queued.record_prompt(ids, hit, timestamp=float(r))
        for i, b in enumerate(ids):
            direct.record_access(b, i < hit, timestamp=float(r), position=i)
        if r % 7 == 0:
            ev = [rng.randrange(60_000) for _ in range(5)]
            queued.record_evictions(ev, "capacity", timestamp=float(r))
            for b in ev:
                direct.record_eviction(b, "capacity", timestamp=float(r))
    assert queued.to_polars().equals(direct.to_polars())
    assert list(queued.iter_evictions()) == list(direct.iter_evictions())


def test_queued_string_ids_take_the_dictionary_path():
    c = AccessStatsCollector()
    for r in range(200):
        c.record_prompt([f"b{r}", f"b{r + 1}"] * 15, 3, timestamp=float(r))
    df = c.to_polars()
    assert df.height == 200 * 30
    assert df["block_id"].to_list()[:3] == ["b0", "b1", "b0"]
    assert df["block_code"].to_list()[:4] == [0, 1, 0, 1]


def _pool_workload(hooks, seed: int, n_ops: int = 1500, flush=None) -> None:
    """A seeded mix of lookups, caching, frees, evictions, invalidations and resets."""
    from sagellm_kv_cache.errors import KVCacheError
    from sagellm_kv_cache.pool import KVPool

    rng = random.Random(seed)
    now = [0.0]

    def clock() -> float:
        now[0] += rng.choice([0.0, 0.0005, 0.003, 0.2, 7.0])
        return now[0]

    pool = KVPool(num_blocks=24, block_size=4, clock=clock)
    for h in hooks(pool):
        pool.add_hook(h)
    prefixes = [[rng.randrange(50) for _ in range(rng.choice([4, 8, 12]))] for _ in range(4)]
    live = []
    for i in range(n_ops):
        op = rng.random()
        try:
            if op < 0.55:
                tail = [rng.randrange(50) for _ in range(rng.randrange(0, 14))]
                h, _ = pool.alloc_with_prefix(
                    rng.choice(prefixes) + tail, request_id=rng.choice([None, f"r{i}"])
                )
                if rng.random() < 0.8:
                    pool.cache_blocks(h)
                live.append(h)
            elif op < 0.85 and live:
                pool.free(live.pop(rng.randrange(len(live))))
            elif op < 0.92:
                pool.evict(rng.randrange(1, 5))
            elif op < 0.985:
                pool.invalidate(list(pool.block_pool.cached)[: rng.randrange(1, 4)])
            else:
                pool.reset()
                live.clear()
        except KVCacheError:
            pass
        if flush is not None:
            flush()


def test_collector_tables_do_not_depend_on_when_the_queue_is_flushed():
    """Differential: flushed after every operation (small batches, the dict path) or
    once at the end (one batch of > 4096 ids, the vectorised path): identical tables."""
    for seed in range(3):
        eager = AccessStatsHook(tier="gpu", block_size_bytes=64)
        lazy = AccessStatsHook(tier="gpu", block_size_bytes=64)
        flush = lambda h=eager: len(h.collector)  # noqa: E731
        _pool_workload(lambda p, h=eager: [h], seed, n_ops=3000, flush=flush)
        _pool_workload(lambda p, h=lazy: [h], seed, n_ops=3000)
        assert 0 < lazy.collector.num_queued < 4096  # flushed in one go below
        a, b = eager.collector, lazy.collector
        assert len(b) == len(a)
        assert len(a) + a.num_evictions > 4096
        assert b.to_polars().equals(a.to_polars())
        assert b.evictions_to_polars().equals(a.evictions_to_polars())
        assert list(b.iter_evictions()) == list(a.iter_evictions())
        assert b.snapshot()["block_keys"] == a.snapshot()["block_keys"]


def test_vectorised_interning_agrees_with_record_access_across_flushes():
    rng = random.Random(11)
    queued, direct = AccessStatsCollector(), AccessStatsCollector()
    for c in (queued, direct):  # ids interned one by one before the vectorised path sees them
        for b in (900, 3, 77):
            c.record_access(b, False, timestamp=0.0)
    for flush in range(3):
        for r in range(250):
            ids = [rng.randrange(2_000) for _ in range(rng.randrange(1, 40))]
            hit = rng.randrange(len(ids) + 1)
            queued.record_prompt(ids, hit, timestamp=float(r))
            for i, b in enumerate(ids):
                direct.record_access(b, i < hit, timestamp=float(r), position=i)
            if r % 5 == 0:
                ev = [rng.randrange(2_500) for _ in range(6)]
                hashes = [b"\x01", 7, ("not", "kept"), None, b"\x02", 3]
                queued.record_evictions(ev, "capacity", timestamp=float(r), block_hashes=hashes)
                for b, h in zip(ev, hashes):
                    kept = h if isinstance(h, (bytes, int)) else None
                    direct.record_eviction(b, "capacity", timestamp=float(r), block_hash=kept)
        assert queued.to_polars().equals(direct.to_polars()), flush
        assert list(queued.iter_evictions()) == list(direct.iter_evictions())
    queued.reset()  # codes restart at 0: the id -> code cache is dropped too
    queued.record_prompt(list(range(5000, 10_000)), 0, timestamp=1.0)
    assert queued.to_polars()["block_code"].to_list()[:3] == [0, 1, 2]


def test_event_stream_read_lazily_equals_the_events_subscribers_get():
    """Differential: events kept unmaterialised until read equal those built eagerly
    for a subscriber, in the same order and with the same sequence numbers."""
    from sagellm_kv_cache.observability import KVEventStream

    for seed in range(3):
        lazy_box, eager_box, got = [], [], []

        def lazy(pool, box=lazy_box):
            box.append(KVEventStream(pool, maxlen=100_000))
            return box

        def eager(pool, box=eager_box, got=got):
            s = KVEventStream(pool, maxlen=100_000)
            s.subscribe(got.append)
            box.append(s)
            return box

        _pool_workload(lazy, seed)
        _pool_workload(eager, seed)
        events = lazy_box[0].events_since(0)
        assert len(events) > 100
        assert events == eager_box[0].events_since(0) == got
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        mid = events[len(events) // 2].seq
        assert lazy_box[0].events_since(mid) == events[mid:]


class OneByOne(PoolHook):
    """Reference for ``AccessStatsHook``: every access and eviction recorded one at a
    time through the collector's public per-record methods (PoolHook fans the
    eviction batches out to ``on_evict``)."""

    def __init__(self, tier: str | None, size: int | None) -> None:
        self.collector = AccessStatsCollector()
        self.tier, self.size = tier, size

    def on_lookup(self, request_id, block_ids, num_hit_blocks, num_blocks, timestamp):
        n = min(len(block_ids), num_blocks) if num_blocks else len(block_ids)
        for i, b in enumerate(block_ids[:n]):
            self.collector.record_access(
                b,
                i < num_hit_blocks,
                timestamp=float(timestamp),
                request_id=request_id,
                position=i,
                tier=self.tier,
                size_bytes=self.size,
            )

    def on_evict(self, block_id, block_hash, reason, timestamp):
        kept = block_hash if isinstance(block_hash, (bytes, int)) else None
        self.collector.record_eviction(
            block_id, reason, timestamp=float(timestamp), block_hash=kept
        )


@given(
    seed=st.integers(0, 10_000),
    tier=st.sampled_from([None, "gpu"]),
    size=st.sampled_from([None, 64]),
)
@settings(max_examples=15)
def test_hook_fast_path_records_what_one_by_one_recording_records(seed, tier, size):
    """Differential: the hook's queued path (no per-call checks, one flat queue,
    vectorised interning) against per-record calls on the same pool events."""
    fast = AccessStatsHook(tier=tier, block_size_bytes=size)
    ref = OneByOne(tier, size)
    _pool_workload(lambda pool: [fast, ref], seed, n_ops=400)
    a, b = fast.collector, ref.collector
    assert a.to_polars().equals(b.to_polars())
    assert a.evictions_to_polars().equals(b.evictions_to_polars())
    assert list(a.iter_evictions()) == list(b.iter_evictions())
    assert a.snapshot()["block_keys"] == b.snapshot()["block_keys"]


class LookupOnly(PoolHook):
    """Overrides no cached-block event: the pool skips it when blocks are cached."""

    def __init__(self) -> None:
        self.lookups = 0

    def on_lookup(self, request_id, block_ids, num_hit_blocks, num_blocks, timestamp):
        self.lookups += 1


def test_hooks_without_cached_events_are_skipped_and_the_others_still_get_every_block():
    from sagellm_kv_cache.hooks import ignores_cached
    from sagellm_kv_cache.observability import KVEventStream

    assert ignores_cached(LookupOnly) and ignores_cached(AccessStatsHook)
    assert not ignores_cached(Batched) and not ignores_cached(PerBlock)
    assert not ignores_cached(DuckTyped) and not ignores_cached(KVEventStream)
    clock_calls = []
    bp = BlockPool(4, block_size=2, clock=lambda: clock_calls.append(1) or 1.0)
    bp.hooks.append(LookupOnly())
    a = bp.allocate(2)
    bp.cache_blocks(a, ["h0", "h1"])
    assert clock_calls == []  # nothing to tell: no timestamp taken, no run sliced
    per = PerBlock()
    bp.hooks.append(per)
    b = bp.allocate(1)
    bp.cache_blocks(a + b, ["h0", "h1", "h2"], 2)
    assert per.calls == [("cached", b[0], "h2", "h1")]
    assert len(clock_calls) == 1
