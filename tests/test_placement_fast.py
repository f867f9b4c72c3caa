"""The fast placement paths against the straightforward ones (hypothesis differential tests).

* the fleet's one-call overlap (``sim.fleet._match_all``: every instance's cached
  leading run at once) and its one-instance peek (``_matcher``) equal each pool's
  own ``match_prefix``, instance by instance;
* ``LoadAwareScheduler.placer`` (devices, metrics and peek looked up once, fast
  tie paths) makes the same choices, with the same counters and ``last_matches``,
  as ``place`` and as a reference written from the module's rule table.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.block_pool import BlockPool
from sagellm_kv_cache.placement import LoadAwareScheduler, LoadMetricsCollector
from sim.fleet import _match_all, _matcher
from sim.global_pool import GlobalPool
from sim.instances import SimClock

#: chains over a small universe so that instances share prefixes: a request's
#: hashes are a path in a tree of branching 3 (the hash is the path itself)
chains = st.lists(st.integers(0, 2), min_size=0, max_size=8).map(
    lambda steps: [tuple(steps[: j + 1]) for j in range(len(steps))]
)


def filled_pools(requests: list[list], num_pools: int, num_blocks: int) -> list[BlockPool]:
    """Pools that each served a share of ``requests`` (cached, freed, LRU-evicted)."""
    pools = [GlobalPool(num_blocks, 4, "lru", SimClock()) for _ in range(num_pools)]
    for r, hs in enumerate(requests):
        pools[r % num_pools].put(hs)  # a prefill's blocks written and released
    return [p.bp for p in pools]


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(chains, min_size=0, max_size=30),
    queries=st.lists(chains, min_size=1, max_size=10),
    num_pools=st.integers(1, 5),
    num_blocks=st.integers(1, 12),
)
def test_fleet_overlap_equals_each_pools_match(requests, queries, num_pools, num_blocks):
    pools = filled_pools(requests, num_pools, num_blocks)
    match_all = _match_all(pools)
    peeks = [_matcher(bp) for bp in pools]
    for hs in queries:
        each = [len(bp.match_prefix(hs)) for bp in pools]
        assert [peek(hs) for peek in peeks] == each
        if hs:  # the engine asks match_all only for requests with full blocks
            assert match_all(hs) == each


# -- scheduler: placer == place == reference ---------------------------------------


def reference_choice(s: LoadAwareScheduler, devices, ms, matches, num_blocks, counts):
    """The rule table, written plainly: sort keys, ties to fewest placements, then first."""

    def argmin(keys):
        low = min(keys)
        tied = [j for j, k in enumerate(keys) if k == low]
        return devices[min(tied, key=lambda j: (counts.get(devices[j], 0), j))]

    requests = [m.active_requests + m.queue_length for m in ms]
    if s.strategy == "longest_prefix":
        return argmin([(-k, q) for k, q in zip(matches, requests)])
    if s.strategy == "kv_cost":
        w = s.overlap_score_weight
        costs = [
            w * (num_blocks - k) + m.kv_tokens_used // m.block_size for k, m in zip(matches, ms)
        ]
        return argmin(costs)  # temperature 0
    hi, lo = max(requests), min(requests)  # cache_aware
    if hi - lo > s.balance_abs_threshold and hi > s.balance_rel_threshold * lo:
        return argmin(requests)
    if num_blocks and max(matches) / num_blocks > s.cache_threshold:
        return argmin([(-k, q) for k, q in zip(matches, requests)])
    return argmin([m.kv_tokens_used for m in ms])


STRATEGIES = [
    ("longest_prefix", {}),
    ("kv_cost", {}),
    ("kv_cost", {"overlap_score_weight": 0.5}),
    ("kv_cost", {"temperature": 0.7, "seed": 3}),
    ("cache_aware", {}),
    ("cache_aware", {"balance_abs_threshold": 1, "balance_rel_threshold": 1.2}),
    ("cache_aware", {"cache_threshold": 0.0}),
]

loads = st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 6))  # active, queued, blocks


@settings(max_examples=120, deadline=None)
@given(
    which=st.integers(0, len(STRATEGIES) - 1),
    requests=st.lists(chains, min_size=0, max_size=20),
    steps=st.lists(
        st.tuples(chains, st.lists(loads, min_size=5, max_size=5)), min_size=1, max_size=25
    ),
    num_pools=st.integers(1, 5),
)
def test_placer_equals_place_and_the_rule_table(which, requests, steps, num_pools):
    strategy, kw = STRATEGIES[which]
    pools = filled_pools(requests, num_pools, 8)
    devices = [f"d{k}" for k in range(num_pools)]
    scheds, collectors = [], []
    for fast_peeks in (False, True):  # one placed through place(), one through placer()
        c = LoadMetricsCollector()
        for d, bp in zip(devices, pools):
            c.register_device(d)
            if fast_peeks:  # the fleet's peeks, all instances in one call
                c.attach_pool(d, _Stats(bp), match_fn=_matcher(bp))
            else:
                c.attach_pool(d, _Stats(bp), match_fn=lambda hs, bp=bp: len(bp.match_prefix(hs)))
        if fast_peeks:
            c.attach_match_many(devices, _match_all(pools))
        scheds.append(LoadAwareScheduler(c, strategy, auto_refresh=False, **kw))
        collectors.append(c)
    slow, fast = scheds
    fast_place = fast.placer(devices)
    for hs, figures in steps:
        for c in collectors:
            for d, (active, queued, blocks) in zip(devices, figures):
                m = c.get_metrics(d)
                m.active_requests, m.queue_length, m.kv_tokens_used = active, queued, blocks * 4
        ms = collectors[0].metrics_of(devices)
        counts = dict(slow.get_placement_stats()["per_device"])
        a = slow.place(devices, 0, hs)
        b = fast_place(0, hs)
        assert a == b
        assert slow.last_matches == fast.last_matches
        assert fast.last_matches == [len(bp.match_prefix(hs)) for bp in pools]
        if not kw.get("temperature"):
            ref = reference_choice(slow, devices, ms, slow.last_matches, len(hs), counts)
            assert a == ref
    assert slow.get_placement_stats() == fast.get_placement_stats()


class _Stats:
    """A pool as the collector sees it: ``get_stats`` over a ``BlockPool``."""

    def __init__(self, bp: BlockPool) -> None:
        self.bp = bp

    def get_stats(self) -> dict:
        return {"block_size": 4, "total_blocks": 8, "used_blocks": self.bp.num_used}


def test_placer_after_a_collector_change_goes_through_place():
    c = LoadMetricsCollector()
    pools = [BlockPool(8, block_size=4) for _ in range(2)]
    for k, bp in enumerate(pools):
        c.attach_pool(k, _Stats(bp), match_fn=_matcher(bp))
    s = LoadAwareScheduler(c, "longest_prefix", auto_refresh=False)
    fast = s.placer([0, 1])
    ids = pools[1].allocate(2)
    pools[1].cache_blocks(ids, ["a", "b"])
    assert fast(0, ["a", "b"]) == 1
    c.register_device(0)  # new metrics for device 0: the placer's are stale now
    c.update_request_count(0, 0, 5)
    assert fast(0, ["x"]) == 1  # fewest requests, read from the live metrics
    assert s.last_matches == [0, 0]
    assert s.get_placement_stats() == {"total_placements": 2, "per_device": {1: 2}}


def test_placer_of_a_load_strategy_is_place():
    c = LoadMetricsCollector()
    for d in ("a", "b"):
        c.register_device(d, kv_tokens_capacity=100)
    c.update_request_count("a", 3, 0)
    s = LoadAwareScheduler(c, "shortest_queue")
    assert s.placer(["a", "b"])(0, None) == "b"
    assert s.get_placement_stats() == {"total_placements": 1, "per_device": {"b": 1}}


@settings(max_examples=150, deadline=None)
@given(
    which=st.integers(0, len(STRATEGIES)),  # the last: round_robin
    requests=st.lists(chains, min_size=0, max_size=20),
    steps=st.lists(
        st.tuples(chains, st.sampled_from(["place", "place", "place", "put", "reset", "aside"])),
        min_size=1,
        max_size=30,
    ),
    num_pools=st.integers(1, 5),
    figures=st.one_of(
        loads.map(lambda f: [f] * 5),  # every device alike (a replay's): the overlap path
        st.lists(loads, min_size=5, max_size=5),
    ),
)
def test_fixed_metrics_placer_equals_place(which, requests, steps, num_pools, figures):
    """``placer(..., fixed_metrics=True)`` while the caches change under it (puts), the
    stats are reset and placements go through ``place`` beside it ("aside")."""
    strategy, kw = STRATEGIES[which] if which < len(STRATEGIES) else ("round_robin", {})
    gps = [GlobalPool(8, 4, "lru", SimClock()) for _ in range(num_pools)]
    for r, hs in enumerate(requests):
        gps[r % num_pools].put(hs)
    pools = [gp.bp for gp in gps]
    devices = [f"d{k}" for k in range(num_pools)]
    scheds = []
    for fast_peeks in (False, True):
        c = LoadMetricsCollector()
        for d, bp, (active, queued, blocks) in zip(devices, pools, figures):
            c.register_device(d)
            c.attach_pool(d, _Stats(bp), match_fn=_matcher(bp))
            m = c.get_metrics(d)
            m.active_requests, m.queue_length, m.kv_tokens_used = active, queued, blocks * 4
        if fast_peeks:
            c.attach_match_many(devices, _match_all(pools))
        scheds.append(LoadAwareScheduler(c, strategy, auto_refresh=False, **kw))
    slow, fast = scheds
    fast_place = fast.placer(devices, fixed_metrics=True)
    for r, (hs, action) in enumerate(steps):
        if action == "put" and hs:
            gps[r % num_pools].put(hs)
        elif action == "reset":
            slow.reset_stats()
            fast.reset_stats()
        elif action == "aside":  # placed on a sub-list through place: counts change
            assert slow.place(devices[:1], 0, hs) == fast.place(devices[:1], 0, hs)
        else:
            assert slow.place(devices, 0, hs) == fast_place(0, hs)
            assert slow.last_matches == fast.last_matches
        assert slow.get_placement_stats() == fast.get_placement_stats()


def test_fixed_metrics_placer_rereads_the_counts_after_a_reset():
    """The overlap path keeps a copy of the placement counts; a reset followed by as
    many placements elsewhere as it had seen must not leave that copy in use."""
    c = LoadMetricsCollector()
    for d in ("a", "b"):
        c.register_device(d)
    s = LoadAwareScheduler(c, "longest_prefix", auto_refresh=False)
    fast = s.placer(["a", "b"], fixed_metrics=True)
    assert [fast(0, None) for _ in range(3)] == ["a", "b", "a"]  # fewest placements, then first
    s.reset_stats()
    assert [s.place(["b"], 0, None) for _ in range(3)] == ["b", "b", "b"]
    assert s.get_placement_stats() == {"total_placements": 3, "per_device": {"b": 3}}
    assert fast(0, None) == "a"  # a: 0 placements since the reset, b: 3
    assert s.get_placement_stats() == {"total_placements": 4, "per_device": {"a": 1, "b": 3}}
