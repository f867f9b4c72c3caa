"""Prefix-aware spatial sampling: whole chains or sessions kept, scaled capacity, spread."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import traces
from sagellm_kv_cache.errors import KVConfigError
from sim.mrc import lru_mrc
from sim.replay import replay_sequential
from sim.sampling import SampleSpec, sample_table, sampled_curve, sampled_replay


@pytest.fixture(scope="module")
def synthetic():
    return traces.generate_trace(1500, seed=7, block_size=16, multi_turn_prob=0.5)


@pytest.mark.parametrize("key", ["root", "session"])
def test_a_sample_keeps_whole_keys(synthetic, key):
    sample, rate = sample_table(synthetic, SampleSpec(rate=0.3, key=key), salt=1)
    assert rate == 0.3 and 0 < sample.height < synthetic.height
    if key == "session":
        kept = set(sample["session_id"].to_list())
        assert synthetic.filter(pl.col("session_id").is_in(list(kept))).height == sample.height
    else:
        roots = synthetic["block_hashes"].list.first()
        kept = set(sample["block_hashes"].list.first().to_list())
        assert int(roots.is_in(list(kept)).sum()) == sample.height


def test_salts_give_different_samples_and_a_salt_the_same_one(synthetic):
    spec = SampleSpec(rate=0.3, key="session")
    a, _ = sample_table(synthetic, spec, 0)
    b, _ = sample_table(synthetic, spec, 0)
    c, _ = sample_table(synthetic, spec, 1)
    assert a.equals(b) and not a.equals(c)


def test_fixed_size_keeps_that_many_keys(synthetic):
    sample, rate = sample_table(synthetic, SampleSpec(rate=None, size=25, key="session"), 0)
    n_sessions = synthetic["session_id"].n_unique()
    assert sample["session_id"].n_unique() == 25
    assert rate == pytest.approx(25 / n_sessions)


def test_rate_one_is_the_exact_curve_with_zero_spread(synthetic):
    caps = [50, 400, 3000]
    exact = lru_mrc(synthetic).hit_ratios(caps)
    s = sampled_curve(synthetic, caps, SampleSpec(rate=1.0, samples=3))
    assert s["token_hit_ratio"].to_list() == exact["token_hit_ratio"].to_list()
    assert s["token_hit_ratio_spread"].to_list() == [0.0, 0.0, 0.0]
    assert s["samples"].to_list() == [3, 3, 3] and s["capacity_blocks"].to_list() == caps


def test_sampled_replay_at_rate_one_is_the_replay(synthetic):
    r = sampled_replay(synthetic, 400, "lru", SampleSpec(rate=1.0, samples=2))
    exact = replay_sequential(synthetic, 400).summary()
    assert r["token_hit_ratio"] == exact["token_hit_ratio"]
    assert r["token_hit_ratio_spread"] == 0.0 and r["samples"] == 2


def test_sampled_figures_carry_their_spread(synthetic):
    s = sampled_curve(synthetic, [200, 2000], SampleSpec(rate=0.2, key="session", samples=4))
    assert set(s.columns) >= {"token_hit_ratio", "token_hit_ratio_spread", "rate", "samples"}
    assert (s["token_hit_ratio_spread"] > 0).all()
    assert np.allclose(s["rate"].to_numpy(), 0.2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1%", SampleSpec(rate=0.01)),
        ("0.05:session", SampleSpec(rate=0.05, key="session")),
        ("1%:root:8", SampleSpec(rate=0.01, key="root", samples=8)),
        ("size=500", SampleSpec(rate=None, size=500)),
    ],
)
def test_spec_text(text, expected):
    assert SampleSpec.parse(text) == expected


@pytest.mark.parametrize(
    "kw",
    [
        {"rate": 0},
        {"rate": 1.5},
        {"rate": True},
        {"rate": -0.01},
        {"rate": float("nan")},
        {"rate": "1%"},
        {"rate": None, "size": 0},
        {"key": "block"},
        {"samples": 0},
    ],
)
def test_bad_spec_is_a_config_error(kw):
    with pytest.raises(KVConfigError):
        SampleSpec(**kw)


def test_bad_text_and_capacity_and_missing_sessions(synthetic):
    with pytest.raises(KVConfigError):
        SampleSpec.parse("lots")
    with pytest.raises(KVConfigError):
        sampled_curve(synthetic, [0])
    with pytest.raises(KVConfigError):
        sample_table(traces.read_trace(), SampleSpec(key="session"), 0)


# -- key "stack": stratified block sampling with weighted stack depths -------------------------
_RATIOS = ["token_hit_ratio", "block_hit_ratio", "request_hit_ratio"]


def test_stack_at_rate_one_is_the_exact_curve_at_every_capacity(synthetic):
    m = lru_mrc(synthetic)
    caps = [5, 50, m.max_request_blocks - 1, m.max_request_blocks, 3000, 10**7]
    exact = m.hit_ratios(caps)
    s = sampled_curve(synthetic, caps, SampleSpec(rate=1.0, key="stack", samples=2))
    for r in _RATIOS:
        assert s[r].to_list() == exact[r].to_list()
        assert s[f"{r}_spread"].to_list() == [0.0] * len(caps)
    assert s["capacity_blocks"].to_list() == caps


def test_stack_estimate_lies_within_its_reported_spread(synthetic):
    m = lru_mrc(synthetic)
    caps = [m.max_request_blocks, 2000, 8000, 30000]
    exact = m.hit_ratios(caps)["token_hit_ratio"].to_numpy()
    s = sampled_curve(synthetic, caps, SampleSpec(rate=0.2, key="stack", samples=6, seed=3))
    est, spread = s["token_hit_ratio"].to_numpy(), s["token_hit_ratio_spread"].to_numpy()
    assert (spread > 0).all()
    # within two spreads (the spread is one sample's standard deviation)
    assert (np.abs(est - exact) <= 2 * spread).all()
    assert np.abs(est - exact).mean() < 0.01


def test_stack_default_key_and_text():
    assert SampleSpec.parse("1%:stack:4") == SampleSpec(rate=0.01, key="stack", samples=4)
    assert SampleSpec.parse("1%").key is None  # curves: stack; replays: root


def test_stack_is_for_curves_only(synthetic):
    spec = SampleSpec(rate=0.5, key="stack")
    with pytest.raises(KVConfigError):
        sample_table(synthetic, spec, 0)
    with pytest.raises(KVConfigError):
        sampled_replay(synthetic, 400, "lru", spec)


def test_stack_python_kernel_equals_numba(synthetic, monkeypatch):
    pytest.importorskip("numba")
    small = synthetic.head(200)
    spec = SampleSpec(rate=0.3, key="stack", samples=2, seed=5)
    compiled = sampled_curve(small, [30, 300, 3000], spec)
    monkeypatch.setenv("SAGELLM_KV_NO_NUMBA", "1")
    assert sampled_curve(small, [30, 300, 3000], spec).equals(compiled)


# -- the one-scan kernel: disjoint bands, hot ids on a move-to-front list ----------------------
def _columns(table):
    from traces.columnar import hash_arrays

    values, offsets = hash_arrays(table)
    fulls = table["input_length"].to_numpy() // 16
    return values, np.ascontiguousarray(offsets[:-1]), fulls


@pytest.mark.parametrize("hot_pick", ["counted", "every_7th_id", "none"])
def test_kernel_at_rate_one_with_hot_ids_is_exact(synthetic, hot_pick):
    from sim.sampling_kernel import hot_ids, sample_pass

    table = synthetic.head(600)
    values, starts, fulls = _columns(table)
    hot = {
        "counted": hot_ids(values),  # ancestors of a hot id are hot: every hot run leads
        "every_7th_id": np.unique(values)[::7],  # hot ids after cold ones: the deferred path
        "none": np.zeros(0, dtype=np.int64),
    }[hot_pick]
    assert hot_pick == "none" or len(hot) > 0
    m = lru_mrc(table)
    caps = np.asarray([5, 50, m.max_request_blocks, 3000, 10**7])
    hit, first, _ = sample_pass(values, starts, fulls, hot, 1.0, 3, caps, hot_rate=1.0)
    assert hit[0].tolist() == m.hit_blocks(caps.tolist()).tolist()
    assert first[0].tolist() == m.hit_ratios(caps.tolist())["hit_requests"].to_list()


def test_kernel_python_equals_numba_with_bands_and_hot_ids(synthetic, monkeypatch):
    pytest.importorskip("numba")
    from sim.sampling_kernel import hot_ids, sample_pass

    values, starts, fulls = _columns(synthetic.head(400))
    hot = hot_ids(values, accesses=8)
    caps = np.asarray([20, 200, 2000])
    args = (values, starts, fulls, hot, 0.2, 5, caps)
    compiled = sample_pass(*args, samples=4, hot_rate=0.3)
    monkeypatch.setenv("SAGELLM_KV_NO_NUMBA", "1")
    python = sample_pass(*args, samples=4, hot_rate=0.3)
    assert compiled[2] == python[2] > 0
    assert np.array_equal(compiled[0], python[0]) and np.array_equal(compiled[1], python[1])


def test_hot_ids_are_the_ids_with_that_many_accesses():
    from sim.sampling_kernel import hot_ids

    values = np.asarray([5] * 70 + [9] * 63 + [-2] * 64 + list(range(100, 200)), dtype=np.int64)
    assert hot_ids(values).tolist() == [-2, 5]


def test_one_scan_samples_are_disjoint_bands_seeded(synthetic):
    spec = SampleSpec(rate=0.05, key="stack", samples=4, seed=11)
    caps = [200, 2000, 8000]
    a = sampled_curve(synthetic, caps, spec)
    assert a.equals(sampled_curve(synthetic, caps, spec))  # the same seed: the same figures
    b = sampled_curve(synthetic, caps, SampleSpec(rate=0.05, key="stack", samples=4, seed=12))
    assert not a.equals(b)
    assert (a["token_hit_ratio_spread"] > 0).all() and a["samples"].to_list() == [4, 4, 4]
    exact = lru_mrc(synthetic).hit_ratios(caps)["token_hit_ratio"].to_numpy()
    assert np.abs(a["token_hit_ratio"].to_numpy() - exact).mean() < 0.05


def test_kernel_bands_must_fit():
    from sim.sampling_kernel import sample_pass

    z = np.zeros(1, dtype=np.int64)
    with pytest.raises(KVConfigError):
        sample_pass(z, z, z, z[:0], 0.4, 0, np.asarray([1]), samples=3)


def test_a_chunked_table_gives_the_figures_of_its_one_chunk_copy(synthetic):
    whole = synthetic.head(600)
    chunked = pl.concat([whole.head(250), whole.slice(250, 100), whole.slice(350)], rechunk=False)
    assert chunked["block_hashes"].n_chunks() == 3
    caps = [50, 400, 3000]
    for spec in (SampleSpec(rate=0.1, samples=4, seed=2), SampleSpec(rate=1.0, samples=2)):
        assert sampled_curve(chunked, caps, spec).equals(sampled_curve(whole, caps, spec))
    exact = lru_mrc(whole).hit_ratios(caps)["token_hit_ratio"].to_list()
    assert sampled_curve(chunked, caps, SampleSpec(rate=1.0))["token_hit_ratio"].to_list() == exact


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_band_is_an_estimate_of_its_own(synthetic, seed):
    # which hot blocks a request looks up must not depend on the band it falls in: each
    # band estimates the whole trace (hits and first-block hits) by itself
    from sim.sampling_kernel import hot_ids, sample_pass

    values, starts, fulls = _columns(synthetic)
    hot = hot_ids(values)
    m = lru_mrc(synthetic)
    caps = [m.max_request_blocks, 10**7]
    hits, first, _ = sample_pass(
        values, starts, fulls, hot, 0.05, seed, np.asarray(caps), samples=4
    )
    assert len(hot) > 0 and hits.shape == (4, 2)
    exact_hits = m.hit_blocks(caps)[-1]
    exact_first = m.hit_ratios(caps)["hit_requests"][-1]
    assert np.all(np.abs(hits[:, -1] / exact_hits - 1) < 0.15)
    assert np.all((first[:, -1] > exact_first / 2) & (first[:, -1] < exact_first * 2))
