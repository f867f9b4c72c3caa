"""SchedulerBridge / SchedulerPlan / KVCacheManager: exact plans and budget-safe execution."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import (
    KVBudgetExceededError,
    KVCacheMissError,
    KVConfigError,
    KVInvalidInputError,
    KVInvalidTypeError,
)
from sagellm_kv_cache.scheduler import SchedRequest, SchedulerBridge

BS = 4


def make_bridge(device_blocks=8, cpu_blocks=0, **kwargs) -> SchedulerBridge:
    return SchedulerBridge(
        device_blocks * BS, block_size=BS, host_max_tokens=cpu_blocks * BS, **kwargs
    )


def make_request(rid: str, prefix: int, num_blocks: int, extra_tokens: int = 0) -> SchedRequest:
    """Prompt ``prefix``'s first ``num_blocks`` full blocks plus ``extra_tokens`` tokens."""
    tokens = [prefix * 1000 + t for t in range(num_blocks * BS + extra_tokens)]
    return SchedRequest(rid, len(tokens), tokens=tokens)


def run_and_free(bridge: SchedulerBridge, req: SchedRequest) -> None:
    bridge.allocate_request(req.request_id, req.num_tokens, tokens=req.tokens, wait=True)
    bridge.free_request(req.request_id)


def test_plan_on_an_empty_pool_admits_fcfs_until_blocks_run_out():
    bridge = make_bridge(device_blocks=8)
    reqs = [
        make_request("a", 1, 3),  # 3 blocks
        make_request("b", 2, 2, extra_tokens=1),  # 3 blocks (one partial)
        make_request("c", 3, 3),  # 3 blocks: only 2 left
        make_request("d", 4, 1),  # fits, but FCFS stops at c
    ]
    plan = bridge.plan(reqs)
    assert plan.admitted_ids == ["a", "b"]
    assert plan.wait_reasons == {"c": "no_blocks", "d": "blocked"}
    assert [r.blocks_to_allocate for r in plan.requests] == [3, 3, 3, 1]
    assert plan.blocks_to_allocate == 6
    assert plan.blocks_to_evict == 0
    assert plan.device_free_blocks_after == 2
    assert bridge.pool.get_stats()["free_blocks"] == 8  # plan changed nothing


def test_plan_without_fcfs_skips_a_waiting_request():
    bridge = make_bridge(device_blocks=8, fcfs=False)
    reqs = [make_request("a", 1, 5), make_request("b", 2, 4), make_request("c", 3, 3)]
    plan = bridge.plan(reqs)
    assert plan.admitted_ids == ["a", "c"]
    assert plan.wait_reasons == {"b": "no_blocks"}


def test_plan_reasons_too_large_max_seqs_and_token_budget():
    bridge = make_bridge(device_blocks=8, max_num_seqs=2, max_num_batched_tokens=20, fcfs=False)
    reqs = [
        make_request("huge", 1, 9),
        make_request("a", 2, 2),  # 8 uncached tokens
        make_request("b", 3, 3),  # 12 -> 20 total: at the budget
        make_request("c", 4, 1),  # third request
    ]
    plan = bridge.plan(reqs)
    assert plan.admitted_ids == ["a", "b"]
    assert plan.wait_reasons == {"huge": "too_large", "c": "max_num_seqs"}
    bridge2 = make_bridge(device_blocks=8, max_num_batched_tokens=12, fcfs=False)
    plan2 = bridge2.plan(reqs[1:])
    assert plan2.admitted_ids == ["a", "c"]
    assert plan2.wait_reasons == {"b": "token_budget"}  # 8 + 12 > 12; then 8 + 4 fits


def test_plan_counts_prefix_hits_and_exact_evictions():
    bridge = make_bridge(device_blocks=8)
    run_and_free(bridge, make_request("x", 1, 4))  # cached, evictable: x0..x3
    run_and_free(bridge, make_request("y", 2, 2))  # cached, evictable: y0, y1
    # z shares x's first two blocks, then needs 4 new ones; free = 2 so 2 evictions:
    # the LRU order is x3, x2, x1, x0, y1, y0 minus z's hits (x0, x1) -> x3, x2
    z = make_request("z", 1, 2)
    z.tokens = z.tokens + [7_000 + t for t in range(4 * BS)]
    z.num_tokens = len(z.tokens)
    plan = bridge.plan([z])
    (rp,) = plan.requests
    assert rp.admitted
    assert rp.hit_blocks_per_tier == {"device": 2}
    assert rp.blocks_to_allocate == 4
    assert rp.blocks_to_evict == 2
    x_hashes = bridge.pool.compute_block_hashes(make_request("x", 1, 4).tokens)
    assert rp.evict_hashes == [x_hashes[3], x_hashes[2]]
    _plan_exec, allocs = bridge.schedule([z])
    assert allocs[0].evicted_hashes == rp.evict_hashes
    assert allocs[0].num_hit_tokens == 2 * BS


def test_plan_reports_lower_tier_hits_and_onboarding():
    bridge = make_bridge(device_blocks=4, cpu_blocks=8)
    run_and_free(bridge, make_request("x", 1, 2))
    run_and_free(bridge, make_request("y", 2, 2))
    run_and_free(bridge, make_request("w", 3, 2))  # evicts x to the cpu tier
    again = make_request("x2", 1, 2, extra_tokens=3)
    plan = bridge.plan([again])
    (rp,) = plan.requests
    assert rp.hit_blocks_per_tier == {"device": 0, "cpu": 2}
    assert rp.hit_tokens_per_tier == {"device": 0, "cpu": 8}
    assert rp.blocks_to_allocate == 3
    assert rp.blocks_to_onboard == 2
    # no free block: 3 victims in LRU order (each request released tail first)
    y = bridge.pool.compute_block_hashes(make_request("y", 2, 2).tokens)
    w = bridge.pool.compute_block_hashes(make_request("w", 3, 2).tokens)
    assert rp.evict_hashes == [y[1], y[0], w[1]]
    _, (alloc,) = bridge.schedule([again], wait=True)
    assert alloc.lookup.hits_per_tier == {"device": 0, "cpu": 2}
    assert alloc.evicted_hashes == rp.evict_hashes
    stats = bridge.get_stats()
    assert stats["tiers"]["cpu"]["hit_blocks"] == 2
    assert stats["running_requests"] == 1


def test_later_requests_in_a_plan_hit_what_earlier_ones_onboard():
    bridge = make_bridge(device_blocks=6, cpu_blocks=8)
    run_and_free(bridge, make_request("x", 1, 2))
    run_and_free(bridge, make_request("y", 2, 3))
    run_and_free(bridge, make_request("w", 3, 3))  # x -> cpu
    a = make_request("a", 1, 2, extra_tokens=1)
    b = make_request("b", 1, 2, extra_tokens=2)
    plan = bridge.plan([a, b])
    assert [r.hit_blocks_per_tier for r in plan.requests] == [
        {"device": 0, "cpu": 2},
        {"device": 2, "cpu": 0},
    ]
    assert [r.blocks_to_allocate for r in plan.requests] == [3, 1]
    _, allocs = bridge.schedule([a, b], wait=True)
    assert [al.lookup.hits_per_tier for al in allocs] == [
        r.hit_blocks_per_tier for r in plan.requests
    ]


def test_request_lifecycle_errors_and_reset():
    bridge = make_bridge(device_blocks=8)
    bridge.allocate_request("r1", 10)
    with pytest.raises(KVInvalidInputError):
        bridge.allocate_request("r1", 10)
    with pytest.raises(KVBudgetExceededError):
        bridge.allocate_request("r2", 40)
    assert bridge.get_stats()["device_pool"]["used_blocks"] == 3
    bridge.free_request("r1")
    with pytest.raises(KVCacheMissError):
        bridge.free_request("r1")
    bridge.allocate_request("r3", 4)
    bridge.reset()
    stats = bridge.get_stats()
    assert stats["running_requests"] == 0 and stats["device_pool"]["used_blocks"] == 0
    assert stats["max_tokens"] == 32


requests_strategy = st.lists(
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(1, 4), st.integers(0, 3)),
        min_size=1,
        max_size=5,
    ),
    min_size=1,
    max_size=5,
)


POLICIES = ["lru", "fifo", "arc", "s3fifo", "lfu", "slru", "leaf:lru"]
CHAINS = {
    "cpu": dict(cpu_blocks=5),
    "cpu+disk": dict(cpu_blocks=3, disk_max_tokens=4 * BS),
    "inclusive": dict(cpu_blocks=5, promote_on_hit=False),
    "write-through": dict(cpu_blocks=5, write_policy="write_through"),
    "admit-after-1": dict(cpu_blocks=5, admit_after_hits=1),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rounds=requests_strategy,
    fcfs=st.booleans(),
    policy=st.sampled_from(POLICIES),
    chain=st.sampled_from(sorted(CHAINS)),
)
# a spill of r4 used to push r5's CPU hit out of the 5-block tier before r5 ran,
# so r5 recomputed it and r6's planned device hit (r5's onboarded block) missed too
@example(
    rounds=[[(4, 2, 0), (0, 4, 0)], [(2, 4, 0)], [(1, 3, 1), (4, 1, 0), (4, 1, 0)]],
    fcfs=False,
    policy="fifo",
    chain="cpu",
)
# r5 hits block 0 in the CPU tier and block 1 on the device: it copies block 1 into its
# own block, and the cache keeps the old one, which r6 evicts; r7 then finds block 1 on
# the CPU tier (the plan used to count it as on the device since r5)
@example(
    rounds=[[(0, 1, 0), (0, 2, 0)], [(1, 1, 1), (2, 4, 1)], [(0, 2, 0), (0, 1, 1), (0, 2, 0)]],
    fcfs=False,
    policy="lru",
    chain="cpu",
)
def test_executing_any_plan_does_exactly_what_it_says(rounds, fcfs, policy, chain):
    bridge = make_bridge(
        device_blocks=8, fcfs=fcfs, async_copies=False, eviction_policy=policy, **CHAINS[chain]
    )
    exact = bridge.planner.exact  # ARC, leaf-only or two lower tiers: an estimate
    n = 0
    for batch in rounds:
        reqs = []
        for prefix, nb, extra in batch:
            n += 1
            reqs.append(make_request(f"r{n}", prefix, nb, extra))
        plan = bridge.plan(reqs)
        executed, allocs = bridge.schedule(reqs)
        got = [a.handle.metadata["request_id"] for a in allocs]
        assert got == executed.admitted_ids
        if exact:
            assert got == plan.admitted_ids
            for rp, a in zip(plan.admitted, allocs):
                assert (
                    rp.blocks_to_allocate
                    == len(a.handle.block_ids) - a.lookup.num_device_hit_blocks
                )
                assert rp.evict_hashes == a.evicted_hashes
                # the batch holds its lower-tier blocks: no spill of an earlier request in
                # it pushes out what a later one was planned to hit
                assert rp.hit_blocks_per_tier == a.lookup.hits_per_tier
        else:  # what it admitted and did not run waits, typed
            assert set(got) <= set(plan.admitted_ids)
            for rp in executed.requests:
                if not rp.admitted and rp.request_id in plan.admitted_ids:
                    assert rp.reason in ("no_blocks", "blocked")
        waiting = plan.waiting
        if exact and waiting and waiting[0].reason in ("no_blocks", "too_large"):
            w = next(r for r in reqs if r.request_id == waiting[0].request_id)
            with pytest.raises(KVBudgetExceededError):
                bridge.allocate_request(w.request_id, w.num_tokens, tokens=w.tokens)
        bridge.manager.check_invariants()  # the holds are gone
        for t in bridge.offload.tiers:
            assert t.pool.num_cached <= t.num_blocks
        for a in allocs:
            bridge.free_request(a.handle.metadata["request_id"])
    bridge.close()


def test_plan_says_where_it_is_only_an_estimate():
    assert make_bridge(eviction_policy="lru", cpu_blocks=4).planner.exact
    assert make_bridge(eviction_policy="leaf:lru").planner.exact  # no lower tier
    assert not make_bridge(eviction_policy="arc").planner.exact  # victims move with hits
    # a leaf-only lower tier keeps a held block's ancestors: less room than counted
    assert not make_bridge(eviction_policy="leaf:lru", cpu_blocks=4).planner.exact
    # a spill overflowing the host tier is assumed to fit the disk tier
    assert not make_bridge(cpu_blocks=4, disk_max_tokens=4 * BS).planner.exact


# -- the plan asks the pool, and peeks only the victims it needs ----------------------------------
class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _fill(bridge: SchedulerBridge, num_requests: int, blocks_each: int) -> None:
    for i in range(num_requests):
        rid = f"fill{i}"
        bridge.allocate_request(
            rid, blocks_each * BS, block_hashes=[(i, j) for j in range(blocks_each)]
        )
        bridge.free_request(rid)


def test_plan_peeks_only_the_victims_it_needs(monkeypatch):
    bridge = make_bridge(device_blocks=2_000)
    _fill(bridge, 500, 4)  # 2,000 evictable blocks, none free
    policy = bridge.pool.block_pool.policy
    asked: list[int] = []
    peek = policy.peek_victims
    monkeypatch.setattr(policy, "peek_victims", lambda n: asked.append(n) or peek(n))
    # a hits fill0's first 2 blocks and needs 3 new; b needs 2 new
    a = SchedRequest("a", 5 * BS, block_hashes=[(0, 0), (0, 1), "a2", "a3", "a4"])
    b = SchedRequest("b", 2 * BS, block_hashes=["b0", "b1"])
    plan = bridge.plan([a, b])
    assert plan.admitted_ids == ["a", "b"]
    assert [r.blocks_to_evict for r in plan.requests] == [3, 2]
    # LRU: the oldest request's blocks tail-first, skipping a's hits (0,0), (0,1)
    want = [(0, 3), (0, 2), (1, 3), (1, 2), (1, 1)]
    assert plan.requests[0].evict_hashes + plan.requests[1].evict_hashes == want
    assert asked and max(asked) <= 16, asked  # not len(policy) == 2,000
    _, allocs = bridge.schedule([a, b])
    assert [x for al in allocs for x in al.evicted_hashes] == want


def test_plan_waits_with_no_victims_when_the_policy_refuses_them():
    clock = _Clock()
    bridge = make_bridge(device_blocks=4, eviction_policy="ttl", clock=clock)
    _fill(bridge, 2, 2)  # 4 cached blocks, none free
    pol = bridge.pool.block_pool.policy
    pol.pin_for(list(range(4)), 100.0)  # every evictable block protected
    before = bridge.get_stats()
    plan = bridge.plan([SchedRequest("x", 2 * BS, block_hashes=["x0", "x1"])])
    assert plan.wait_reasons == {"x": "no_victims"} and plan.blocks_to_evict == 0
    assert bridge.pool.peek_admission(2) == "no_victims"  # the pool's own answer
    assert bridge.get_stats() == before
    _, allocs = bridge.schedule([SchedRequest("x", 2 * BS, block_hashes=["x0", "x1"])])
    assert allocs == []  # waits instead of failing mid-schedule
    clock.t = 200.0  # protection over
    assert bridge.plan([SchedRequest("x", 2 * BS, block_hashes=["x0", "x1"])]).admitted_ids == ["x"]


def test_a_later_request_meets_refused_victims_too():
    clock = _Clock()
    bridge = make_bridge(device_blocks=4, eviction_policy="ttl", clock=clock)
    _fill(bridge, 2, 2)
    pol = bridge.pool.block_pool.policy
    pol.pin_for([0, 1], 100.0)  # fill0 protected, fill1 evictable
    a = SchedRequest("a", 2 * BS, block_hashes=["a0", "a1"])
    b = SchedRequest("b", 1 * BS, block_hashes=["b0"])
    plan = bridge.plan([a, b])
    assert plan.admitted_ids == ["a"] and plan.wait_reasons == {"b": "no_victims"}
    assert plan.requests[0].evict_hashes == [(1, 1), (1, 0)]
    _, allocs = bridge.schedule([a, b])
    assert [al.handle.metadata["request_id"] for al in allocs] == ["a"]
    bridge.manager.check_invariants()


# -- bad input: typed errors, nothing allocated, nothing leaked ----------------------------------
def _state(bridge: SchedulerBridge) -> tuple:
    bridge.manager.check_invariants()
    s = bridge.get_stats()
    return bridge.manager.running, s["device_pool"], s["requests"], s["query_blocks"]


def test_schedule_checks_every_request_before_allocating_any():
    bridge = make_bridge(device_blocks=8)
    a, b = make_request("a", 1, 1), make_request("b", 2, 1)
    run_and_free(bridge, make_request("warm", 3, 1))
    bridge.allocate_request("run", 4)
    before = _state(bridge)
    bad_batches = [
        ([a, b, a], KVInvalidInputError),  # listed twice: the second allocation would fail
        ([a, SchedRequest("run", 4)], KVInvalidInputError),  # already running
        ([a, SchedRequest("b", 4, tokens=list(range(8)))], KVInvalidInputError),  # 4 != 8
        ([a, {"request_id": "b"}], KVInvalidInputError),  # no length
        ([a, {"request_id": "b", "num_tokens": 4, "prio": 1}], KVInvalidInputError),
        ([a, {"request_id": 7, "num_tokens": 4}], KVInvalidTypeError),
        ([a, SchedRequest("b", 4.0)], KVInvalidTypeError),
        ([a, SchedRequest("b", 4, block_hashes=[[1]])], KVInvalidTypeError),
        ([a, SchedRequest("b", 4, block_hashes=[None])], KVInvalidInputError),
        ([a, SchedRequest("b", None, tokens=iter(b.tokens))], KVInvalidTypeError),
        ([a, SchedRequest("b", None, tokens=set(b.tokens))], KVInvalidTypeError),
        ([a, 5], KVInvalidTypeError),
    ]
    for batch, err in bad_batches:
        with pytest.raises(err) as info:
            bridge.schedule(batch)
        assert info.value.code == err.code
        with pytest.raises(err):
            bridge.plan(batch)
        assert _state(bridge) == before
    for bad in (None, "ab", 5, a):
        with pytest.raises(KVInvalidTypeError):
            bridge.schedule(bad)
        assert _state(bridge) == before


def _fail_second_allocation(monkeypatch, bridge, during=None) -> list[str]:
    """Make the bridge's second ``manager.allocate`` of a call raise
    ``KVBudgetExceededError``; returns the request ids allocate was called with
    (``during()`` runs on each call first, while the batch is under way)."""
    real = bridge.manager.allocate
    calls: list[str] = []

    def flaky(request_id, *args, **kwargs):
        calls.append(request_id)
        if during is not None:
            during()
        if len(calls) == 2:
            raise KVBudgetExceededError("injected")
        return real(request_id, *args, **kwargs)

    monkeypatch.setattr(bridge.manager, "allocate", flaky)
    return calls


def test_schedule_frees_what_it_allocated_when_a_later_allocation_fails(monkeypatch):
    bridge = make_bridge(device_blocks=8)
    before = _state(bridge)
    calls = _fail_second_allocation(monkeypatch, bridge)
    with pytest.raises(KVBudgetExceededError):
        bridge.schedule([make_request("a", 1, 2), make_request("b", 2, 2)])
    assert calls == ["a", "b"]
    running, device, *_ = _state(bridge)
    assert running == [] and device["used_blocks"] == 0 and device["num_handles"] == 0
    assert device["cached_blocks"] == before[1]["cached_blocks"] == 0


def test_a_failed_schedule_leaves_no_hold_in_the_lower_tier(monkeypatch):
    bridge = make_bridge(device_blocks=4, cpu_blocks=4)
    run_and_free(bridge, make_request("w1", 1, 2))
    run_and_free(bridge, make_request("w2", 2, 2))
    run_and_free(bridge, make_request("w3", 3, 2))  # w1's blocks spill into the cpu tier
    cpu = bridge.offload.tier("cpu")
    assert cpu.pool.num_cached == 2
    held: list[int] = []  # the batch holds w1's blocks while it runs
    calls = _fail_second_allocation(monkeypatch, bridge, lambda: held.append(cpu.num_held))
    with pytest.raises(KVBudgetExceededError):
        bridge.schedule([make_request("a", 4, 1), make_request("b", 1, 2)])
    assert calls == ["a", "b"] and held == [2, 2] and cpu.num_held == 0
    running, device, *_ = _state(bridge)  # check_invariants: no hold left anywhere
    assert running == [] and device["used_blocks"] == 0
    # w1's blocks are still in the cpu tier, now evictable like any other
    assert bridge.manager.lookup(tokens=make_request("b", 1, 2).tokens).hits_per_tier["cpu"] == 2


def test_manager_rejects_bad_arguments_with_nothing_allocated():
    bridge = make_bridge(device_blocks=8)
    m = bridge.manager
    bridge.allocate_request("run", 8, tokens=list(range(8)))
    before = _state(bridge)
    cases = [
        (lambda: m.allocate("a", tokens=(t for t in range(8))), KVInvalidTypeError),
        (lambda: m.allocate("a", tokens={1, 2, 3, 4}), KVInvalidTypeError),
        (lambda: m.allocate("a", 4, tokens=list(range(8))), KVInvalidInputError),
        (lambda: m.allocate("a", 4, block_hashes=[b"x", ["y"]]), KVInvalidTypeError),
        (lambda: m.allocate("a", 4, block_hashes=b"xy"), KVInvalidTypeError),
        (lambda: m.allocate("a", 4, wait=True, timeout="1"), KVInvalidTypeError),
        (lambda: m.allocate("a", 4, wait=True, timeout=-1), KVInvalidTypeError),
        (lambda: m.free(["run"]), KVInvalidTypeError),
        (lambda: m.get_handle({}), KVInvalidTypeError),
        (lambda: m.cache("run", -4), KVInvalidInputError),
        (lambda: m.cache("run", 4.0), KVInvalidTypeError),
        (lambda: m.lookup(block_hashes=[[1]]), KVInvalidTypeError),
        (lambda: m.lookup(t for t in range(8)), KVInvalidTypeError),
        (lambda: m.lookup(list(range(8)), block_hashes=[b"x"]), KVInvalidInputError),
    ]
    for call, err in cases:
        with pytest.raises(err) as info:
            call()
        assert info.value.code == err.code
        assert _state(bridge) == before


def test_numpy_integers_are_accepted_as_counts():
    np = pytest.importorskip("numpy")
    bridge = make_bridge(device_blocks=8, max_num_seqs=np.int64(2))
    plan = bridge.plan([{"request_id": "a", "num_tokens": np.int64(5)}])
    assert plan.admitted_ids == ["a"] and plan.requests[0].blocks_to_allocate == 2
    alloc = bridge.allocate_request("b", np.int32(8))
    assert alloc.handle.num_tokens == 8 and type(alloc.handle.num_tokens) is int


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_num_seqs": 0},
        {"max_num_seqs": 1.5},
        {"max_num_seqs": True},
        {"max_num_batched_tokens": -1},
        {"max_num_batched_tokens": "64"},
    ],
)
def test_scheduler_limits_are_checked(kwargs):
    with pytest.raises(KVConfigError):
        make_bridge(**kwargs)


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu"])
def test_a_plan_peeks_only_the_victims_its_requests_need(monkeypatch, policy):
    """1,000 evictable device blocks; a plan of two missing requests of 3 blocks asks the
    policy for a handful of victims, never the evictable set (its cost is flat in it)."""
    bridge = make_bridge(device_blocks=1000, eviction_policy=policy)
    for i in range(250):
        run_and_free(bridge, make_request(f"fill{i}", i, 4))
    asked: list[int] = []
    policy_type = type(bridge.pool.policy)
    peek = policy_type.peek_victims

    def spy(self, k):
        asked.append(k)
        return peek(self, k)

    monkeypatch.setattr(policy_type, "peek_victims", spy)
    plan = bridge.plan([make_request("a", 900, 3), make_request("b", 901, 3)])
    assert plan.admitted_ids == ["a", "b"]
    assert [r.blocks_to_evict for r in plan.requests] == [3, 3]
    assert asked and max(asked) <= 12, asked


def test_plan_counts_a_block_a_request_names_twice_once():
    """Block hashes given by the caller (not chained) may repeat: the plan's admission of
    a later request counts the one cached block it names four times once, as the
    pool's own admission does, and the schedule then runs it."""
    bridge = make_bridge(device_blocks=6)
    hs = list("abcdef")
    bridge.allocate_request("warm", 6 * BS, block_hashes=hs, wait=True)
    bridge.free_request("warm")  # a..f cached and evictable, nothing free
    first = SchedRequest("p", BS, block_hashes=["p"])
    again = SchedRequest("r", 7 * BS, block_hashes=["a"] * 4 + ["x", "y", "z"])
    plan = bridge.plan([first, again])
    assert plan.admitted_ids == ["p", "r"]
    assert [r.blocks_to_allocate for r in plan.requests] == [1, 3]
    _, allocs = bridge.schedule([first, again])
    assert [a.num_hit_tokens for a in allocs] == [0, 4 * BS]
    assert allocs[1].handle.block_ids[:4] == [allocs[1].handle.block_ids[0]] * 4
