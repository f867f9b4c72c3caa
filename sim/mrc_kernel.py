"""The stack-distance pass of ``sim.mrc``: a Fenwick tree over release positions.

Input is columnar: ``ids`` the dense id (0..num_ids-1) of every full block in
trace order, ``fulls`` each request's count of full blocks. Output, per full
block, its running-max stack depth (``INF`` for a cold miss), per request the
distinct ids seen through it, and whether the ids are prefix-chained (each
id always follows the same id). The algorithm is the one ``sim.mrc``'s
docstring derives.

One loop (:func:`_loop`), run two ways: by the interpreter over plain lists
(:func:`depths_python`, the reference and the fallback) and compiled by numba
over arrays (:func:`depths_numba`, used when numba is installed: the ``numba``
extra); a test holds them bit-identical. Memory: the tree and the
depths take 4 + 8 bytes per full block (the tree's cells are 4 bytes below
2**31 blocks), the id -> position and id -> parent maps 4 bytes per distinct
id each.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["INF", "dense_ids", "depths_numba", "depths_python", "numba_available", "stack_depths"]

INF = 1 << 62  # depth of a cold miss: above every capacity
_UNSET = -2  # parent not seen yet (-1: the id starts a request)


def dense_ids(values: np.ndarray) -> tuple[np.ndarray, int]:
    """``values`` renumbered 0..k-1 in sorted order of value (int32 when it fits), and ``k``."""
    if not len(values):
        return np.zeros(0, dtype=np.int32), 0
    order = np.argsort(values, kind="stable")
    step = np.empty(len(values), dtype=bool)
    step[0] = False
    chunk = 1 << 22  # compare neighbours in slices: no sorted copy of the values
    for a in range(1, len(values), chunk):
        b = min(a + chunk, len(values))
        np.not_equal(values[order[a:b]], values[order[a - 1 : b - 1]], out=step[a:b])
    k = int(np.count_nonzero(step)) + 1
    dtype = np.int32 if k < 2**31 else np.int64
    ranks = np.cumsum(step, dtype=dtype)
    del step
    out = np.empty(len(values), dtype=dtype)
    out[order] = ranks
    return out, k


def depths_python(ids: Any, fulls: Any, num_ids: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The reference: :func:`_loop` run by the interpreter over plain lists."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    fulls = fulls.tolist() if hasattr(fulls, "tolist") else list(fulls)
    depths = [0] * len(ids)
    seen = [0] * len(fulls)
    tree = [0] * (len(ids) + 1)
    chained = _loop(ids, fulls, tree, [-1] * num_ids, [_UNSET] * num_ids, depths, seen)
    return np.asarray(depths, dtype=np.int64), np.asarray(seen, dtype=np.int64), bool(chained)


def _loop(ids, fulls, tree, pos, parent, depths, seen):
    """The pass itself, written once: run as is over lists (the reference) or compiled
    by numba over arrays. Fills ``depths`` and ``seen``; returns ``chained``."""
    total = len(ids)
    chained = True
    distinct = 0
    t = 0
    superseded = 0
    for i in range(len(fulls)):
        full = fulls[i]
        if full == 0:
            seen[i] = distinct
            continue
        m = -1
        prev = -1
        for k in range(t, t + full):  # depths against the stack before this request
            h = ids[k]
            if parent[h] == _UNSET:
                parent[h] = prev
            elif parent[h] != prev:
                chained = False
            prev = h
            if m != INF:
                p = pos[h]
                if p < 0:
                    m = INF
                else:
                    j = p + 1
                    s = 0
                    while j:
                        s += tree[j]
                        j &= j - 1
                    d = t - p - 1 - (superseded - s)
                    if d > m:
                        m = d
            depths[k] = m
        # release tail-first: the last block gets position t, the first t + full - 1
        new = t + full - 1
        for k in range(t, t + full):
            h = ids[k]
            p = pos[h]
            if p >= 0:
                j = p + 1
                while j <= total:
                    tree[j] += 1
                    j += j & -j
                superseded += 1
            else:
                distinct += 1
            pos[h] = new
            new -= 1
        t += full
        seen[i] = distinct
    return chained


_compiled: Any = None


def numba_available() -> bool:
    """Whether numba imports (and ``SAGELLM_KV_NO_NUMBA`` is not set)."""
    if os.environ.get("SAGELLM_KV_NO_NUMBA"):
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def depths_numba(
    ids: np.ndarray, fulls: np.ndarray, num_ids: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The same loop compiled by numba (``ImportError`` without numba)."""
    global _compiled
    if _compiled is None:
        import numba

        _compiled = numba.njit(cache=True, nogil=True)(_loop)
    depths = np.empty(len(ids), dtype=np.int64)
    seen = np.empty(len(fulls), dtype=np.int64)
    # positions and counts stay below the block count: 4-byte cells while that fits
    small = np.int32 if len(ids) < 2**31 - 1 else np.int64
    tree = np.zeros(len(ids) + 1, dtype=small)
    pos = np.full(num_ids, -1, dtype=small)
    parent = np.full(num_ids, _UNSET, dtype=small)
    chained = _compiled(
        np.ascontiguousarray(ids), np.asarray(fulls, np.int64), tree, pos, parent, depths, seen
    )
    return depths, seen, bool(chained)


def stack_depths(ids: np.ndarray, fulls: np.ndarray, num_ids: int, *, kernel: str = "auto"):
    """``(depths, distinct_through, chained)``: numba when available (``kernel="auto"``),
    or the one named (``"numba"``, ``"python"``)."""
    if kernel == "python" or (kernel == "auto" and not numba_available()):
        return depths_python(ids, fulls, num_ids)
    return depths_numba(ids, fulls, num_ids)
