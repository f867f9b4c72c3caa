"""The stack-distance pass: the numba kernel is bit-identical to the Python reference."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from sim.mrc import lru_mrc
from sim.mrc_kernel import INF, dense_ids, depths_python, stack_depths
from traces import generate_trace, read_trace


def test_dense_ids_keep_the_order_of_values():
    ids, k = dense_ids(np.asarray([50, -3, 50, 7, -3], dtype=np.int64))
    assert ids.tolist() == [2, 0, 2, 1, 0] and k == 3


def test_python_reference_on_a_hand_checkable_trace():
    # requests [a b] [a c] [a b]: dense a=0 b=1 c=2
    depths, seen, chained = depths_python([0, 1, 0, 2, 0, 1], [2, 2, 2], 3)
    assert depths.tolist() == [INF, INF, 0, INF, 0, 2]
    assert seen.tolist() == [2, 3, 3]
    assert chained is True


@pytest.mark.parametrize("name", ["mooncake", "synthetic", "unchained"])
def test_numba_kernel_is_bit_identical_to_python(name):
    pytest.importorskip("numba", reason="numba is not installed (the fast extra)")
    rng = np.random.default_rng(3)
    if name == "mooncake":
        ids, k = dense_ids(np.concatenate(read_trace()["block_hashes"].to_list()))
        fulls = read_trace()["block_hashes"].list.len().to_numpy()
    elif name == "synthetic":
        t = generate_trace(400, seed=2, block_size=16, multi_turn_prob=0.5)
        ids, k = dense_ids(np.concatenate(t["block_hashes"].to_list()))
        fulls = t["block_hashes"].list.len().to_numpy()
    else:  # random ids: not prefix-chained, repeats inside a request
        fulls = rng.integers(0, 6, size=300)
        ids, k = dense_ids(rng.integers(0, 40, size=int(fulls.sum())))
    d_py, s_py, c_py = stack_depths(ids, fulls, k, kernel="python")
    d_nb, s_nb, c_nb = stack_depths(ids, fulls, k, kernel="numba")
    assert d_py.dtype == d_nb.dtype == np.int64
    assert np.array_equal(d_py, d_nb) and np.array_equal(s_py, s_nb) and c_py == c_nb
    if name == "unchained":
        assert c_py is False


def test_curve_is_the_same_with_either_kernel():
    pytest.importorskip("numba", reason="numba is not installed (the fast extra)")
    t = generate_trace(300, seed=5, block_size=16)
    a, b = lru_mrc(t, kernel="python"), lru_mrc(t, kernel="numba")
    assert np.array_equal(a.stack_depths, b.stack_depths)
    assert a.hit_ratios([10, 100, None]).equals(b.hit_ratios([10, 100, None]))


def test_str_ids_give_the_curve_of_their_int_codes():
    t = generate_trace(200, seed=9, block_size=16)
    as_str = t.with_columns(t["block_hashes"].cast(pl.List(pl.Utf8)))
    a, b = lru_mrc(t), lru_mrc(as_str)
    assert np.array_equal(a.stack_depths, b.stack_depths)
    assert a.hit_ratios([20, None]).equals(b.hit_ratios([20, None]))
