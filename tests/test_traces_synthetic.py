"""Seeded synthetic traces (traces/synthetic.py): reproducibility and prefix structure."""

from __future__ import annotations

import math

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVConfigError
from traces import (
    CANONICAL_COLUMNS,
    PrefixModel,
    bundled_path,
    generate_trace,
    ids_to_tokens,
    read_trace,
    write_trace,
)
from traces.make_samples import write_samples

SESSIONS = dict(
    num_system_prompts=4,
    system_prompt_tokens=48,
    system_prompt_prob=0.7,
    num_documents=6,
    document_tokens=100,
    document_prob=0.4,
    multi_turn_prob=0.5,
    own_tokens_mean=40.0,
    output_tokens_mean=20.0,
)


def make_trace(n: int = 300, seed: int = 0, **kw):
    return generate_trace(n, seed=seed, **{**SESSIONS, **kw})


def check_chained(ids_lists: list[list[int]]) -> None:
    """An id determines its position and every id before it (by induction: its parent)."""
    where: dict[int, tuple[int, int | None]] = {}
    for ids in ids_lists:
        for j, h in enumerate(ids):
            key = (j, ids[j - 1] if j else None)
            assert where.setdefault(h, key) == key, f"id {h} stands for two prefixes"


def test_same_seed_same_table_other_seed_differs():
    a = make_trace(seed=3)
    assert a.columns == list(CANONICAL_COLUMNS)
    assert a.equals(make_trace(seed=3))
    b = make_trace(seed=4)
    assert not a.equals(b)
    assert a["block_hashes"].to_list() != b["block_hashes"].to_list()


def test_poisson_arrivals_and_recorded_arrivals():
    t = generate_trace(2000, seed=1, rate=10.0, multi_turn_prob=0.0)
    arr = t["arrival_s"].to_numpy()
    assert arr[0] == 0.0 and (arr[1:] >= arr[:-1]).all()
    assert abs(len(arr) / arr[-1] - 10.0) < 1.5  # mean rate, 2000 draws
    rec = [0.0, 0.5, 0.5, 3.0]
    t = generate_trace(arrivals=rec, seed=1)
    assert t["arrival_s"].to_list() == rec and t["request_id"].to_list() == [
        "syn-0",
        "syn-1",
        "syn-2",
        "syn-3",
    ]
    with pytest.raises(KVConfigError):
        generate_trace(arrivals=[1.0, 0.5])
    with pytest.raises(KVConfigError):
        generate_trace(5, arrivals=[0.0])


def test_lengths_and_block_counts():
    t = make_trace(block_size=16)
    for n_in, ids, bs in t.select("input_length", "block_hashes", "block_size").iter_rows():
        assert bs == 16 and len(ids) == math.ceil(n_in / 16)
    check_chained(t["block_hashes"].to_list())


def test_multi_turn_turn_k_starts_with_turn_k_minus_1_context():
    t = make_trace(600, seed=5, max_context_tokens=4000)
    assert t["turn"].max() >= 4
    last: dict[str, tuple[int, int, list[int], int]] = {}
    continued = 0
    for n_in, n_out, ids, sid, turn in t.select(
        "input_length", "output_length", "block_hashes", "session_id", "turn"
    ).iter_rows():
        if sid in last:
            p_in, p_out, p_ids, p_turn = last[sid]
            assert turn == p_turn + 1
            full = p_in // 16
            assert ids[:full] == p_ids[:full]  # the previous turn's whole input...
            assert n_in > p_in + p_out  # ...plus its output, plus new tokens
            assert len(ids) > (p_in + p_out) // 16
            continued += 1
        else:
            assert turn == 1
        last[sid] = (n_in, n_out, ids, turn)
    assert continued > 100


def test_min_think_time_between_turns():
    t = make_trace(400, seed=6, rate=5.0, min_think_s=3.0)
    gaps = (
        t.sort("session_id", "arrival_s", maintain_order=True)
        .group_by("session_id", maintain_order=True)
        .agg(pl.col("arrival_s").diff().drop_nulls().min().alias("gap"), pl.len())
        .filter(pl.col("len") > 1)
    )
    assert gaps.height > 20 and gaps["gap"].min() >= 3.0
    with pytest.raises(KVConfigError):
        generate_trace(3, min_think_s=-1.0)


def test_shared_system_prompt_ids():
    t = generate_trace(
        200,
        seed=2,
        num_system_prompts=1,
        system_prompt_tokens=64,
        system_prompt_prob=1.0,
        block_size=16,
    )
    assert all(ids[:4] == [0, 1, 2, 3] for ids in t["block_hashes"].to_list())
    t = generate_trace(200, seed=2, system_prompt_prob=0.0)
    firsts = [ids[0] for ids in t["block_hashes"].to_list()]
    assert len(set(firsts)) == len(firsts)  # nothing shared


def test_prompt_popularity_is_zipf():
    t = generate_trace(
        3000,
        seed=9,
        num_system_prompts=10,
        system_prompt_tokens=32,
        system_prompt_zipf=1.5,
        system_prompt_prob=1.0,
    )
    counts = t.select(pl.col("block_hashes").list.first().alias("h"))["h"].value_counts(sort=True)
    top = counts["count"].to_list()
    assert len(top) == 10
    share = top[0] / sum(top)
    assert 0.35 < share < 0.55  # 1 / H(10, 1.5) = 0.44
    assert top[0] > 2 * top[1] > top[2]


def test_documents_follow_prompt_and_share_blocks():
    t = generate_trace(
        400,
        seed=4,
        num_system_prompts=2,
        system_prompt_tokens=32,
        system_prompt_prob=1.0,
        num_documents=3,
        document_tokens=64,
        document_prob=1.0,
    )
    heads = {tuple(ids[:6]) for ids in t["block_hashes"].to_list()}
    assert len(heads) == 6  # 2 prompts x 3 documents, 6 full blocks each
    by_prompt: dict[tuple, set] = {}
    for h in heads:
        by_prompt.setdefault(h[:2], set()).add(h[2:])
    assert len(by_prompt) == 2 and all(len(v) == 3 for v in by_prompt.values())


def test_prefix_model_fit_hand_checked():
    m = PrefixModel(block_size=4, system_prompt_prob=0.0, multi_turn_prob=1.0, max_open_sessions=1)
    assert m.fit(10, 3) == ([0, 1, 2], "s1", 1)  # context 13 tokens: blocks 0, 1, then 3
    assert m.fit(20, 0) == ([0, 1, 3, 4, 5], "s1", 2)
    assert m.fit(5, 1) == ([6, 7], "s2", 1)  # 5 <= context 20: a new session
    assert m.fit(0, 1) == ([], "s3", 1)


@given(
    seed=st.integers(0, 2**32),
    block_size=st.sampled_from([1, 4, 16, 64]),
    prompt_tokens=st.integers(1, 200),
    multi=st.floats(0, 1),
    prob=st.floats(0, 1),
)
@settings(max_examples=30, deadline=None)
def test_generator_invariants(seed, block_size, prompt_tokens, multi, prob):
    t = generate_trace(
        60,
        seed=seed,
        block_size=block_size,
        num_system_prompts=3,
        system_prompt_tokens=prompt_tokens,
        system_prompt_prob=prob,
        num_documents=2,
        document_tokens=50,
        document_prob=prob,
        multi_turn_prob=multi,
        own_tokens_mean=30.0,
        max_context_tokens=2000,
    )
    ids_lists = t["block_hashes"].to_list()
    for n_in, ids in zip(t["input_length"].to_list(), ids_lists):
        assert len(ids) == -(-n_in // block_size) and n_in >= 1
    check_chained(ids_lists)
    assert t["turn"].min() == 1


def test_tokens_output_rehashes_to_same_structure(tmp_path):
    t = make_trace(120, seed=8)
    p = write_trace(t, tmp_path / "syn.jsonl", format="tokens")
    back = read_trace(p, format="tokens", block_size=16)
    seen: dict = {}
    mapping = [[seen.setdefault(h, len(seen)) for h in ids] for ids in back["block_hashes"]]
    seen2: dict = {}
    orig = [[seen2.setdefault(h, len(seen2)) for h in ids] for ids in t["block_hashes"]]
    assert mapping == orig
    assert back["input_length"].to_list() == t["input_length"].to_list()


def test_ids_to_tokens_is_a_function_of_ids():
    a = ids_to_tokens([5, 6, 7], 40, 16)
    assert len(a) == 40 and a == ids_to_tokens([5, 6, 7], 40, 16)
    assert a[:16] == ids_to_tokens([5], 16, 16) and a[16:32] != a[:16]
    assert all(0 <= x < 32000 for x in a)
    assert ids_to_tokens([-3], 4, 4, vocab_size=10) == ids_to_tokens([-3], 4, 4, vocab_size=10)


def test_bad_model_parameters():
    for kw in (
        {"system_prompt_prob": 1.5},
        {"multi_turn_prob": -0.1},
        {"num_system_prompts": -1},
        {"system_prompt_zipf": -1.0},
        {"block_size": 0},
        {"seed": "x"},
    ):
        with pytest.raises(KVConfigError):
            generate_trace(3, **kw)
    with pytest.raises(KVConfigError):
        generate_trace(3, rate=0)


def test_shipped_synthetic_samples_are_reproducible(tmp_path):
    for fresh in write_samples(tmp_path):
        shipped = bundled_path("bailian-synthetic-sample").parent / fresh.name
        assert fresh.read_bytes() == shipped.read_bytes(), fresh.name
    t = read_trace(bundled_path("bailian-synthetic-sample"))
    assert t.height == 400 and t["turn"].max() > 1 and t["block_size"].unique().to_list() == [16]
