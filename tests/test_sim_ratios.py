"""``sim.ratios``: the three hit ratios, defined once, on hand-checked numbers, zero
denominators (scalars and arrays), and as every result reports them."""

from __future__ import annotations

import numpy as np
import pytest

from sim.mrc import lru_mrc
from sim.ratios import block_hit_ratio, hit_ratios, request_hit_ratio, token_hit_ratio
from sim.simulate import simulate
from traces import DEFAULT_TRACE, read_trace


@pytest.fixture(scope="module")
def trace():
    return read_trace(DEFAULT_TRACE).head(400)


def test_hand_checked() -> None:
    # 3 hit blocks of 16 tokens in 100 prompt tokens (6 full blocks, 4 requests, 1 hit)
    assert token_hit_ratio(3, 16, 100) == 0.48
    assert block_hit_ratio(3, 6) == 0.5
    assert request_hit_ratio(1, 4) == 0.25
    assert hit_ratios(3, 1, block_size=16, prompt_tokens=100, full_blocks=6, num_requests=4) == {
        "token_hit_ratio": 0.48,
        "block_hit_ratio": 0.5,
        "request_hit_ratio": 0.25,
    }


def test_a_zero_denominator_gives_zero_of_the_numerators_shape() -> None:
    for r in (token_hit_ratio(0, 16, 0), block_hit_ratio(0, 0), request_hit_ratio(0, 0)):
        assert r == 0.0 and isinstance(r, float)
    arr = token_hit_ratio(np.array([1, 2, 3]), 16, 0)
    assert arr.dtype == np.float64 and arr.tolist() == [0.0, 0.0, 0.0]
    arr = block_hit_ratio(np.array([1, 2]), 4)
    assert arr.tolist() == [0.25, 0.5]


def _from_records(res) -> dict:
    rec = res.records
    return hit_ratios(
        int(rec["hit_blocks"].sum()),
        int((rec["hit_blocks"] > 0).sum()),
        block_size=res.block_size,
        prompt_tokens=int(rec["input_length"].sum()),
        full_blocks=int(rec["full_blocks"].sum()),
        num_requests=rec.height,
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "sequential"},
        {"mode": "concurrent"},
        {"mode": "sequential", "instances": 3, "router": "longest-prefix"},
    ],
)
def test_a_results_ratios_are_its_records_ratios(trace, kw) -> None:
    res = simulate(trace, 200, **kw)
    s = res.summary()
    assert {k: s[k] for k in _from_records(res)} == _from_records(res)


def test_the_curve_at_a_capacity_equals_the_replay_there(trace) -> None:
    mrc = lru_mrc(trace)
    row = mrc.hit_ratios([mrc.max_request_blocks + 50]).row(0, named=True)
    res = simulate(trace, mrc.max_request_blocks + 50, mode="sequential")
    assert {k: row[k] for k in _from_records(res)} == _from_records(res)
    inf = mrc.infinite()
    assert inf["token_hit_ratio"] == token_hit_ratio(
        inf["hit_blocks"], mrc.block_size, mrc.prompt_tokens
    )
