"""EvictionManager (seed API): exact handle selections by strategy, TTL and priority."""

from __future__ import annotations

import enum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sagellm_kv_cache
from sagellm_kv_cache.compat.eviction_manager import (
    EvictionManager,
    EvictionStrategy,
    FIFOEviction,
    LRUEviction,
)
from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError, KVNoVictimError
from sagellm_kv_cache.eviction.registry import EvictionPolicyName
from sagellm_kv_cache.handle import KVHandle


def make_handle(name: str, tokens: int, created: float, accessed: float, **kw) -> KVHandle:
    """A freed handle (ref_count 0) unless told otherwise."""
    kw.setdefault("ref_count", 0)
    return KVHandle(
        num_tokens=tokens,
        handle_id=name,
        created_at=created,
        last_access_at=accessed,
        **kw,
    )


def ids(handles: list[KVHandle]) -> list[str]:
    return [h.handle_id for h in handles]


@pytest.fixture
def handles() -> list[KVHandle]:
    # name, tokens, created, last access
    return [
        make_handle("a", 32, created=10, accessed=50),
        make_handle("b", 16, created=20, accessed=30),
        make_handle("c", 64, created=30, accessed=40),
        make_handle("d", 16, created=40, accessed=45),
    ]


def test_exported_from_the_package():
    assert sagellm_kv_cache.EvictionManager is EvictionManager
    assert sagellm_kv_cache.LRUEviction is LRUEviction
    assert sagellm_kv_cache.FIFOEviction is FIFOEviction
    assert sagellm_kv_cache.EvictionStrategy is EvictionStrategy


@pytest.mark.parametrize(
    ("policy", "need", "want"),
    [
        # LRU by last access: b(30) c(40) d(45) a(50)
        ("lru", 1, ["b"]),
        ("lru", 16, ["b"]),
        ("lru", 17, ["b", "c"]),
        ("lru", 80, ["b", "c"]),
        ("lru", 81, ["b", "c", "d"]),
        ("lru", 128, ["b", "c", "d", "a"]),
        # FIFO by creation: a(10) b(20) c(30) d(40)
        ("fifo", 32, ["a"]),
        ("fifo", 33, ["a", "b"]),
        ("fifo", 49, ["a", "b", "c"]),
        ("fifo", 0, []),
    ],
)
def test_exact_selection(handles, policy, need, want):
    assert ids(EvictionManager(policy).select_victims(handles, need)) == want


def test_not_enough_tokens_raises_and_selects_nothing(handles):
    mgr = EvictionManager("lru")
    with pytest.raises(KVNoVictimError) as err:
        mgr.select_victims(handles, 129)
    assert err.value.code == "KV_NO_VICTIM"
    assert err.value.details == {"needed": 129, "available": 128}
    assert mgr.get_stats()["selections"] == 0
    with pytest.raises(KVNoVictimError):
        mgr.select_victims(handles, 81, max_victims=2)  # b + c = 80 tokens
    assert ids(mgr.select_victims(handles, 80, max_victims=2)) == ["b", "c"]
    assert mgr.get_stats()["selected_tokens"] == 80
    with pytest.raises(KVNoVictimError):
        mgr.select_victims([], 1)


def test_pinned_and_live_handles_are_never_selected(handles):
    handles[1].ref_count = 1  # b still in use
    handles[2].pin_count = 1  # c pinned
    mgr = EvictionManager("lru")
    assert ids(mgr.order(handles)) == ["d", "a"]
    assert ids(mgr.select_victims(handles, 48)) == ["d", "a"]
    with pytest.raises(KVNoVictimError):
        mgr.select_victims(handles, 49)


def test_ttl_expired_handles_go_first_in_strategy_order(handles):
    # now = 100, ttl 58: idle > 58 s means last access < 42: b(30), c(40)
    mgr = EvictionManager("fifo", ttl_seconds=58, clock=lambda: 100.0)
    assert ids(mgr.order(handles)) == ["b", "c", "a", "d"]
    assert ids(mgr.select_victims(handles, 70)) == ["b", "c"]
    # exactly ttl old (last access 42 would be) is not expired: d at 45 and a at 50 stay
    mgr = EvictionManager("lru", ttl_seconds=55, clock=lambda: 100.0)
    assert ids(mgr.order(handles)) == ["b", "c", "d", "a"]  # d idle exactly 55 s: not expired


def test_priority_orders_before_strategy_and_default_applies(handles):
    handles[1].metadata["priority"] = 90  # b: keep
    handles[3].metadata["priority"] = 5  # d: drop first
    mgr = EvictionManager("lru")  # default priority 35 for a and c
    assert ids(mgr.order(handles)) == ["d", "c", "a", "b"]
    mgr = EvictionManager("lru", default_priority=95)
    assert ids(mgr.order(handles)) == ["d", "b", "c", "a"]
    # TTL-expired handles still go first whatever their priority
    mgr = EvictionManager("lru", ttl_seconds=60, clock=lambda: 100.0)
    assert ids(mgr.order(handles)) == ["b", "d", "c", "a"]


def test_ties_keep_input_order():
    hs = [make_handle(n, 16, created=5, accessed=5) for n in "xyz"]
    assert ids(EvictionManager("lru").order(hs)) == ["x", "y", "z"]
    assert ids(EvictionManager("fifo").order(list(reversed(hs)))) == ["z", "y", "x"]


def test_set_policy_and_accepted_forms(handles):
    mgr = EvictionManager()
    assert mgr.policy_name == "lru" and isinstance(mgr.policy, LRUEviction)
    mgr.set_policy("FIFO")
    assert ids(mgr.select_victims(handles, 1)) == ["a"]
    mgr.set_policy(EvictionPolicyName.LRU)
    assert ids(mgr.select_victims(handles, 1)) == ["b"]
    mgr.set_policy(FIFOEviction)
    assert mgr.policy_name == "fifo"

    class Biggest(EvictionStrategy):
        name = "biggest"

        def order(self, handles):
            return sorted(handles, key=lambda h: -h.num_tokens)

    mgr.set_policy(Biggest())
    assert ids(mgr.select_victims(handles, 65)) == ["c", "a"]
    assert EvictionManager(EvictionPolicyName.FIFO).policy_name == "fifo"


class Color(enum.Enum):
    RED = "red"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"policy": "lfu"},
        {"policy": Color.RED},
        {"policy": 3},
        {"ttl_seconds": 0},
        {"ttl_seconds": -5},
        {"ttl_seconds": "60"},
        {"default_priority": 101},
        {"default_priority": 3.5},
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(KVConfigError):
        EvictionManager(**kwargs)


def test_set_policy_bad_keeps_old(handles):
    mgr = EvictionManager("fifo")
    with pytest.raises(KVConfigError):
        mgr.set_policy("nope")
    assert mgr.policy_name == "fifo"


def test_bad_arguments(handles):
    mgr = EvictionManager()
    for need in (-1, 1.5, True, None):
        with pytest.raises(KVInvalidInputError):
            mgr.select_victims(handles, need)
    with pytest.raises(KVInvalidInputError):
        mgr.select_victims(handles, 1, max_victims=-1)
    with pytest.raises(KVInvalidInputError):
        mgr.select_victims(handles[0], 1)  # one handle, not a list
    with pytest.raises(KVInvalidInputError):
        mgr.select_victims([handles[0], "b"], 1)
    with pytest.raises(KVInvalidInputError):
        mgr.select_victims([handles[0], handles[0]], 1)  # listed twice
    handles[0].metadata["priority"] = 500
    with pytest.raises(KVInvalidInputError):
        mgr.select_victims(handles, 1)


def test_strategy_that_loses_handles_is_a_config_error(handles):
    class Lossy(EvictionStrategy):
        def order(self, handles):
            return list(handles)[:1]

    with pytest.raises(KVConfigError):
        EvictionManager(Lossy()).select_victims(handles, 1)


@settings(max_examples=100, deadline=None)
@given(
    spec=st.lists(
        st.tuples(
            st.integers(1, 64),  # tokens
            st.integers(0, 100),  # created
            st.integers(0, 100),  # last access
            st.booleans(),  # live
            st.booleans(),  # pinned
        ),
        max_size=12,
    ),
    need=st.integers(0, 300),
    policy=st.sampled_from(["lru", "fifo"]),
)
def test_selection_is_the_shortest_covering_prefix(spec, need, policy):
    hs = [
        make_handle(str(i), t, created=c, accessed=a, ref_count=int(live), pin_count=int(pin))
        for i, (t, c, a, live, pin) in enumerate(spec)
    ]
    field = "last_access_at" if policy == "lru" else "created_at"
    # reference: stable sort of the free, unpinned handles by the strategy's timestamp
    order = sorted(
        (h for h in hs if not h.ref_count and not h.pin_count), key=lambda h: getattr(h, field)
    )
    want, total = [], 0
    for h in order:
        if total >= need:
            break
        want.append(h)
        total += h.num_tokens
    mgr = EvictionManager(policy)
    if total < need:
        with pytest.raises(KVNoVictimError):
            mgr.select_victims(hs, need)
    else:
        assert ids(mgr.select_victims(hs, need)) == ids(want)
