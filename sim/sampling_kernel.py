"""The pass of ``sim.sampling``'s ``"stack"`` key: weighted stack depths of a block sample.

Why blocks may be sampled here: in the sequential-LRU model of ``sim.mrc`` a
block hits at capacity ``C`` iff its stack depth (distinct blocks above it in
the global recency stack) is ``< C``; the prefix rule holds by itself, since a
request releases tail-first and a parent always sits above its child. So the
curve is a function of per-access stack depths, and SHARDS-style sampling
applies: keep a block when a salted hash of its id falls under the rate, and
estimate a depth as the *weight* of the kept distinct blocks above it
(Horvitz-Thompson: each kept block weighs 1 / its keep probability).

Stratified: a few blocks (system prompts, popular documents) carry a large
share of all accesses; sampling them would make the estimate hinge on
whether one of them is drawn. Blocks whose hash bucket counts at least
``hot`` accesses are kept in every sample with weight 1 (all blocks of such a
bucket: the keep probability stays a function of the id alone). Weights are
integers in units of ``1 / UNIT`` block so the tree sums exactly.

The tree is a Fenwick tree over the kept accesses' release positions holding
each live position's weight; when the timeline fills it is compacted to the
live positions (amortised O(1)), so it stays about twice the kept distinct
blocks: small and cache-resident. One loop (:func:`_pass`), run by numba when
installed, else by the interpreter (the reference; slow on big traces).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["UNIT", "bucket_counts", "sample_pass"]

UNIT = 1 << 20  # weight of a block kept with probability 1
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_GOLD = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def _mix(v: Any, salt: Any) -> Any:
    """splitmix64 of a uint64 xor a salt (wraps: uint64 under numba, masked in Python)."""
    x = (v ^ salt) + np.uint64(_GOLD)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    return x ^ (x >> np.uint64(31))


def _counts_loop(values, offsets, fulls, shift, counts):
    salt = np.uint64(0x5EED)
    for i in range(len(fulls)):
        a = offsets[i]
        for k in range(a, a + fulls[i]):
            counts[_mix(np.uint64(values[k]), salt) >> shift] += 1


def _pass(values, offsets, fulls, shift, hot_bucket, thr, salt, w_cold, caps, acc, req_acc):
    """Kept accesses' weighted depths, accumulated per capacity.

    ``acc[j]`` (``req_acc[j]``) gets the weight of every kept block (request's
    first block) that first hits at ``caps[j]`` (sorted); index ``len(caps)``
    collects the misses. Returns the number of kept accesses.
    """
    ncap = len(caps)
    size = 1 << 12
    keys = np.zeros(size, dtype=np.uint64)
    used = np.zeros(size, dtype=np.bool_)
    slot_id = np.zeros(size, dtype=np.int64)
    live = 0  # kept distinct ids
    posv = np.zeros(1024, dtype=np.int64)  # id -> position (-1: not yet)
    wv = np.zeros(1024, dtype=np.int64)  # id -> weight
    cap_t = 1 << 12
    tree = np.zeros(cap_t + 1, dtype=np.int64)
    owner = np.full(cap_t, -1, dtype=np.int64)
    t = 0
    total = 0
    kept_n = 0
    cur_ids = np.zeros(64, dtype=np.int64)
    cur_k = np.zeros(64, dtype=np.int64)
    for i in range(len(fulls)):
        full = fulls[i]
        a = offsets[i]
        n = 0
        for k in range(a, a + full):  # the request's kept blocks
            v = np.uint64(values[k])
            if hot_bucket[_mix(v, np.uint64(0x5EED)) >> shift]:
                w = UNIT
            elif _mix(v, salt) < thr:
                w = w_cold
            else:
                continue
            s = np.int64(_mix(v, np.uint64(0)) & np.uint64(size - 1))  # open addressing
            while used[s] and keys[s] != v:
                s = (s + 1) & np.int64(size - 1)
            if not used[s]:
                if live >= len(posv):
                    posv = np.concatenate((posv, np.full(len(posv), -1, dtype=np.int64)))
                    wv = np.concatenate((wv, np.zeros(len(wv), dtype=np.int64)))
                used[s] = True
                keys[s] = v
                slot_id[s] = live
                posv[live] = -1
                wv[live] = w
                live += 1
                if 2 * live > size:  # grow the table: rehash
                    size *= 2
                    nk = np.zeros(size, dtype=np.uint64)
                    nu = np.zeros(size, dtype=np.bool_)
                    ns = np.zeros(size, dtype=np.int64)
                    for q in range(len(keys)):
                        if used[q]:
                            r = np.int64(_mix(keys[q], np.uint64(0)) & np.uint64(size - 1))
                            while nu[r]:
                                r = (r + 1) & np.int64(size - 1)
                            nu[r] = True
                            nk[r] = keys[q]
                            ns[r] = slot_id[q]
                    keys, used, slot_id = nk, nu, ns
                    s = np.int64(0)
                    while not (used[s] and keys[s] == v):
                        s += 1
            if n >= len(cur_ids):
                cur_ids = np.concatenate((cur_ids, cur_ids))
                cur_k = np.concatenate((cur_k, cur_k))
            cur_ids[n] = slot_id[s]
            cur_k[n] = k - a
            n += 1
        if n == 0:
            continue
        kept_n += n
        # depths against the stack before the request, running max along it
        m = -1
        for q in range(n):
            h = cur_ids[q]
            if m >= 0 and m == (1 << 62):
                d = m
            else:
                p = posv[h]
                if p < 0:
                    d = 1 << 62
                else:
                    j = p + 1
                    s2 = 0
                    while j:
                        s2 += tree[j]
                        j &= j - 1
                    d = total - s2
            if d > m:
                m = d
            # first capacity index it hits at: depth < C * UNIT and full <= C
            lo = 0
            hi = ncap
            while lo < hi:
                mid = (lo + hi) >> 1
                if caps[mid] * UNIT <= m or caps[mid] < full:
                    lo = mid + 1
                else:
                    hi = mid
            acc[lo] += wv[h]
            if cur_k[q] == 0:
                req_acc[lo] += wv[h]
        # release tail-first: positions ascend from the last kept block to the first
        if t + n > cap_t:  # compact the timeline to the live positions
            newcap = max(2 * (live + n), 1 << 12)
            tree = np.zeros(newcap + 1, dtype=np.int64)
            nown = np.full(newcap, -1, dtype=np.int64)
            nt = 0
            for p in range(t):
                h = owner[p]
                if h >= 0:
                    nown[nt] = h
                    posv[h] = nt
                    tree[nt + 1] = wv[h]
                    nt += 1
            for j in range(1, newcap + 1):  # linear Fenwick build
                up = j + (j & -j)
                if up <= newcap:
                    tree[up] += tree[j]
            owner = nown
            cap_t = newcap
            t = nt
        for q in range(n - 1, -1, -1):
            h = cur_ids[q]
            p = posv[h]
            w = wv[h]
            if p >= 0:
                owner[p] = -1
                j = p + 1
                while j <= cap_t:
                    tree[j] -= w
                    j += j & -j
            else:
                total += w
            posv[h] = t
            owner[t] = h
            j = t + 1
            while j <= cap_t:
                tree[j] += w
                j += j & -j
            t += 1
    return kept_n


_jit: dict = {}


def _kernel(name: str, fn: Any) -> Any:
    if os.environ.get("SAGELLM_KV_NO_NUMBA"):
        return fn
    if name not in _jit:
        try:
            import numba
        except ImportError:
            _jit[name] = fn
        else:
            import types

            # the loop calls _mix: compile it too, in the loop's own globals
            glb = dict(fn.__globals__, _mix=numba.njit(cache=True)(_mix))
            _jit[name] = numba.njit(cache=True, nogil=True)(
                types.FunctionType(fn.__code__, glb, name)
            )
    return _jit[name]


def bucket_counts(values: np.ndarray, offsets: np.ndarray, fulls: np.ndarray, bits: int):
    """Accesses per hash bucket (``2**bits`` buckets, a salt-free hash of the id)."""
    counts = np.zeros(1 << bits, dtype=np.int64)
    fn = _kernel("counts", _counts_loop)
    with np.errstate(over="ignore"):
        fn(values, offsets, fulls, np.uint64(64 - bits), counts)
    return counts


def sample_pass(
    values: np.ndarray,
    offsets: np.ndarray,
    fulls: np.ndarray,
    bits: int,
    hot_bucket: np.ndarray,
    rate: float,
    salt: int,
    caps: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(hit weight per sorted capacity, first-block hit weight per capacity, kept accesses)``,
    weights in blocks (floats), for one sample."""
    thr = np.uint64(_MASK if rate >= 1 else int(rate * 2.0**64))
    w_cold = UNIT if rate >= 1 else round(UNIT / rate)
    acc = np.zeros(len(caps) + 1, dtype=np.int64)
    req = np.zeros(len(caps) + 1, dtype=np.int64)
    fn = _kernel("pass", _pass)
    salt_u = np.uint64((salt * _GOLD + 1) & _MASK)
    if rate >= 1:
        hot_bucket = np.ones_like(hot_bucket)
    with np.errstate(over="ignore"):
        kept = fn(
            values,
            offsets,
            fulls,
            np.uint64(64 - bits),
            hot_bucket,
            thr,
            salt_u,
            w_cold,
            np.asarray(caps, dtype=np.int64),
            acc,
            req,
        )
    return np.cumsum(acc)[:-1] / UNIT, np.cumsum(req)[:-1] / UNIT, int(kept)
