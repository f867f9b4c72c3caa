"""Reuse distance and reuse time of an access sequence (numpy only).

The *reuse distance* (LRU stack distance) of an access is the number of
distinct other blocks accessed since the previous access to the same block;
a first access has none (reported as ``-1``)::

    position   0  1  2  3  4  5
    block      A  B  A  C  B  A
    distance  -1 -1  1 -1  2  2      (A@2 saw {B}; B@4 saw {A, C}; A@5 saw {C, B})

An LRU cache of ``c`` blocks hits exactly the accesses whose distance is
below ``c``, so the distribution is the miss-ratio curve of every LRU size.

How it is computed, O(n log n): keep one marker per block at its last
access. The distance of access ``i`` whose previous access is ``p`` is the
number of markers strictly between ``p`` and ``i``; markers are only ever
added at the right end, so that count is ``distinct_seen - (p + 1) +
removed(<= p)`` where ``removed`` counts positions whose marker already moved
on. ``removed`` is a dominance count (earlier reuses with a smaller previous
index), computed bit level by bit level with vectorised sorts and cumsums;
everything is numpy, no Python loop per access.
"""

from __future__ import annotations

import numpy as np

__all__ = ["previous_access_index", "reuse_distances", "reuse_times"]


def previous_access_index(codes: np.ndarray) -> np.ndarray:
    """Index of the previous access to the same block, ``-1`` for a first access.

    Args:
        codes: integer block codes, one per access, in access order.

    Returns:
        int64 array of the same length.
    """
    codes = np.asarray(codes)
    prev = np.full(len(codes), -1, dtype=np.int64)
    if len(codes) < 2:
        return prev
    order = np.argsort(codes, kind="stable")  # stable: equal codes stay in access order
    same = codes[order[1:]] == codes[order[:-1]]
    prev[order[1:][same]] = order[:-1][same]
    return prev


def reuse_distances(codes: np.ndarray, prev: np.ndarray | None = None) -> np.ndarray:
    """Reuse (stack) distance of every access, ``-1`` for first accesses.

    Args:
        codes: integer block codes in access order.
        prev: ``previous_access_index(codes)`` when already computed.

    Returns:
        int64 array of the same length as ``codes``.
    """
    if prev is None:
        prev = previous_access_index(codes)
    n = len(prev)
    out = np.full(n, -1, dtype=np.int64)
    reuse_at = np.flatnonzero(prev >= 0)
    if len(reuse_at) == 0:
        return out
    distinct_seen = np.cumsum(prev < 0)  # distinct blocks among accesses 0..i
    prevs = prev[reuse_at]
    removed = _removed_before(prevs, n)
    # distinct blocks before i (block of i already seen, so cumsum at i equals it)
    out[reuse_at] = distinct_seen[reuse_at] - (prevs + 1) + removed
    return out


def _removed_before(prevs: list[int] | np.ndarray, n: int) -> np.ndarray:
    """For each reuse in order, how many earlier reuses had a previous index <= its own.

    Previous indices are distinct (an access is the previous access of at most
    one later access), so this is "how many earlier values are smaller",
    counted one bit level at a time from the most significant bit, all
    vectorised: an earlier value ``v_j`` is smaller than ``v_k`` exactly when,
    at the first bit where they differ, ``v_j`` has 0 and ``v_k`` has 1. At
    each level the values are grouped by their higher bits (keeping access
    order inside a group) and every value whose bit is 1 counts the earlier
    0s of its group: ``bit_length`` sorts of the reuses in all, O(n log n)
    without a Python-level loop per access.
    """
    v = np.asarray(prevs, dtype=np.int64)
    m = len(v)
    res = np.zeros(m, dtype=np.int64)
    if m < 2:
        return res
    bits = int(v.max()).bit_length()
    for shift in range(bits - 1, -1, -1):
        prefix = v >> (shift + 1)
        order = _group_order(prefix, m)
        pre = prefix[order]
        one = ((v[order] >> shift) & 1).astype(bool)
        zeros_incl = np.cumsum(~one)  # 0-bits up to and including each position
        starts = np.flatnonzero(np.r_[True, pre[1:] != pre[:-1]])
        sizes = np.diff(np.r_[starts, m])
        # 0-bits before the group's first position, repeated over the group
        base = np.repeat(zeros_incl[starts] - (~one[starts]), sizes)
        res[order[one]] += (zeros_incl - base)[one]
    return res


_INT64_MAX = 2**63 - 1


def _group_order(prefix: np.ndarray, m: int) -> np.ndarray:
    """Indices sorting by ``prefix`` (values >= 0), ties in index (access) order.

    Fast path: one sort of the combined key ``prefix * m + index`` (faster than
    a stable argsort). That key overflows int64 once ``max(prefix) * m`` passes
    2**63 (about 3e9 accesses), which would silently mis-order the groups, so
    the bound is checked in exact integers and a stable argsort (the same
    order, no combined key) takes over above it.
    """
    if len(prefix) == 0:
        return np.empty(0, dtype=np.int64)
    if int(prefix.max()) * m + (m - 1) <= _INT64_MAX:
        return np.sort(prefix * m + np.arange(m, dtype=np.int64)) % m
    return np.argsort(prefix, kind="stable")


def reuse_times(timestamps: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Seconds since the previous access to the same block; NaN for first accesses."""
    out = np.full(len(prev), np.nan, dtype=np.float64)
    m = prev >= 0
    out[m] = timestamps[m] - timestamps[prev[m]]
    return out
