"""Prefix-aware Belady OPT: exact on hand-checkable and brute-forced traces, and a bound."""

from __future__ import annotations

import random
from functools import cache
from itertools import combinations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVInvalidInputError
from sagellm_kv_cache.eviction.registry import POLICIES
from sim.opt import replay_opt
from sim.replay import replay_sequential
from tests._chains import random_chained_chains, table_from_chains
from traces import read_trace


def brute_force_best(chains: list[list[int]], cap: int) -> int:
    """Most hit blocks any eviction choices reach under the library's semantics.

    A request hits its leading run of cached ids; the other ``n - k`` blocks are
    allocated (free slots first), the shortfall evicted from cached ids outside the
    leading run (any choice); afterwards all its ids are cached.
    """
    reqs = [tuple(c) for c in chains]

    @cache
    def best(i: int, cached: frozenset) -> int:
        if i == len(reqs):
            return 0
        r = reqs[i]
        if not r or len(r) > cap:
            return best(i + 1, cached)
        k = 0
        while k < len(r) and r[k] in cached:
            k += 1
        shortfall = max(0, len(r) - k - (cap - len(cached)))
        evictable = sorted(cached - set(r[:k]))
        return k + max(
            best(i + 1, (cached - frozenset(v)) | frozenset(r))
            for v in combinations(evictable, shortfall)
        )

    return best(0, frozenset())


@pytest.fixture(scope="module")
def mooncake():
    return read_trace()


def test_hand_checkable_beats_lru():
    # capacity 3: at request 2 LRU evicts block 2 (released last by request 0),
    # OPT evicts block 3 (never used again) and request 3 hits both 1 and 2
    t = table_from_chains([[1, 2], [3], [4], [1, 2]])
    opt, lru = replay_opt(t, 3), replay_sequential(t, 3, "lru")
    assert list(opt.records["hit_blocks"]) == [0, 0, 0, 2]
    assert list(opt.records["evicted_blocks"]) == [0, 0, 1, 0]
    assert list(lru.records["hit_blocks"]) == [0, 0, 0, 1]
    assert (opt.hit_blocks, opt.evictions, opt.policy) == (2, 1, "opt")
    assert opt.block_hit_ratio == 2 / 6 and opt.request_hit_ratio == 1 / 4


def test_ties_evict_the_deeper_block_first():
    # request 1 must evict one of 1 2 3, all next used by request 2: the child 3 goes,
    # keeping the cache prefix-closed so request 2 hits 1 2; then 7 (never used) goes
    t = table_from_chains([[1, 2, 3], [7], [1, 2, 3]])
    r = replay_opt(t, 3)
    assert list(r.records["hit_blocks"]) == [0, 0, 2]
    assert list(r.records["evicted_blocks"]) == [0, 1, 1]
    assert r.hit_blocks == brute_force_best([[1, 2, 3], [7], [1, 2, 3]], 3) == 2


def test_oversized_requests_are_misses_and_cache_nothing():
    t = table_from_chains([[1, 2], [3, 4, 5], [1, 2]], [0, 7, 0])
    r = replay_opt(t, 2)
    assert list(r.records["hit_blocks"]) == [0, 0, 2]
    assert list(r.records["full_blocks"]) == [2, 3, 2] and r.evictions == 0
    assert r.prompt_tokens == 7 * 16 + 7


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), num_requests=st.integers(1, 6), cap=st.integers(1, 5))
def test_equals_brute_force_optimum(seed, num_requests, cap):
    chains = random_chained_chains(random.Random(seed), num_requests, 3)
    assert replay_opt(table_from_chains(chains), cap).hit_blocks == brute_force_best(chains, cap)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), num_requests=st.integers(1, 30), max_new=st.integers(1, 6))
def test_bounds_every_registered_policy(seed, num_requests, max_new):
    rng = random.Random(seed)
    chains = random_chained_chains(rng, num_requests, max_new)
    t = table_from_chains(chains, [rng.choice([0, 3]) for _ in chains])
    inf = replay_sequential(t, None, "lru")
    assert replay_opt(t, None).hit_blocks == inf.hit_blocks
    distinct = len({h for c in chains for h in c})
    for cap in sorted({1, 2, 3, 5, 8, max(1, distinct // 2), distinct}):
        opt = replay_opt(t, cap)
        assert opt.hit_blocks <= inf.hit_blocks
        for name in POLICIES:
            online = replay_sequential(t, cap, name)
            assert opt.hit_blocks >= online.hit_blocks, (name, cap)
            assert opt.full_blocks == online.full_blocks


def test_mooncake_bounds(mooncake):
    inf = replay_sequential(mooncake, None, "lru")
    assert replay_opt(mooncake, None).hit_blocks == inf.hit_blocks == 77_740
    for cap, lru_hits, opt_hits in ((1_000, 10_370, 32_791), (10_000, 52_952, 75_069)):
        r = replay_opt(mooncake, cap)
        assert r.hit_blocks == opt_hits and lru_hits < opt_hits <= inf.hit_blocks
        assert r.records["request_id"][0] == mooncake["request_id"][0]
        assert r.summary()["policy"] == "opt"


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_capacity_raises(bad):
    with pytest.raises(KVInvalidInputError):
        replay_opt(table_from_chains([[1, 2]]), bad)


def test_capacity_text_is_any_unit_and_bad_text_a_config_error():
    from sagellm_kv_cache.errors import KVConfigError

    t = table_from_chains([[1, 2], [1, 2, 3]])
    assert replay_opt(t, "2").capacity_blocks == 2
    assert replay_opt(t, "50%").capacity_blocks == 1  # of 3 distinct blocks, rounded down
    with pytest.raises(KVConfigError) as err:
        replay_opt(t, "lots")
    assert err.value.code == "KV_CONFIG_INVALID"


def test_bad_table_raises():
    with pytest.raises(KVInvalidInputError):
        replay_opt(table_from_chains([[1]]).drop("input_length"), 4)


def test_non_chained_ids_still_replay():
    # id 2 follows 1 and 3; request 1 names 2 twice: runs, counts, never evicts a held block
    t = table_from_chains([[1, 2], [3, 2, 2], [1, 2]])
    r = replay_opt(t, 3)
    assert list(r.records["hit_blocks"]) == [0, 0, 2]
    assert r.hit_blocks <= replay_opt(t, None).hit_blocks


def test_progress_bar_changes_nothing(capsys):
    t = table_from_chains(random_chained_chains(random.Random(7), 50, 5))
    a, b = replay_opt(t, 10, progress=True), replay_opt(t, 10)
    assert (a.records["hit_blocks"] == b.records["hit_blocks"]).all()
    assert "replay opt @ 10 blocks" in capsys.readouterr().err
