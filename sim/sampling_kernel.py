"""The pass of ``sim.sampling``'s ``"stack"`` key: weighted stack depths of block samples.

Why blocks may be sampled here: in the sequential-LRU model of ``sim.mrc`` a
block hits at capacity ``C`` iff its stack depth (distinct blocks above it in
the global recency stack) is ``< C``; the prefix rule holds by itself, since a
request releases tail-first and a parent always sits above its child. So the
curve is a function of per-access stack depths, and SHARDS-style sampling
applies: keep a block when a salted hash of its id falls in a band of width
``rate``, and estimate a depth as the *weight* of the kept distinct blocks
above it (Horvitz-Thompson: a kept cold block weighs ``1 / rate``; the same as
scaling the capacity by the rate).

One scan, several samples: the hash of every id is computed once; sample
``s`` keeps the ids whose hash falls in band ``[s, s + 1) x rate x 2**64``, so
``samples`` disjoint samples come out of one pass (when ``samples x rate <=
1``; otherwise one pass per sample, each with its own salt). An id outside
every band costs a hash and two compares; nothing else.

Hot blocks (system prompts, popular documents) carry a large share of all
accesses; sampling them would make the estimate hinge on whether one of them
is drawn. The caller names them (:func:`hot_ids`: ids with many accesses in a
salt-free position sample of the trace); they are in every sample with weight
1, kept in a move-to-front list ordered by release time (an O(1) move per
access, shared by all samples). A request's leading run of hot blocks is
released as it is read (with chained ids every later block of the request is
a descendant, already below it, so no depth in the request changes), and a
hot id remembers the hot id that followed it, so a repeated chain is
recognised by comparing ids, without hashing. Their own hits are estimated
from a sample of hot accesses: each request is looked up in one sample (a
salted hash of its index), each hot block with probability ``hot_rate``
(weight the inverse). The hot blocks above an access are counted on the list
by walking it from both ends at once: ``min(above, below)`` steps.

Cold kept blocks hold positions on a release timeline per sample; a Fenwick
tree marks the superseded ones (as in ``sim.mrc_kernel``: a first release
costs no tree operation, a re-release one); when a timeline fills it is
compacted to the live positions (amortised O(1)), so it stays about twice the
kept distinct blocks. Weights
are integers in units of ``1 / UNIT`` block so the tree sums exactly; at rate 1
(every block kept, weight 1) the depths are the exact ones of ``sim.mrc``.

One loop (:func:`_pass`), run by numba when installed, else by the
interpreter (the reference; slow on big traces).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sagellm_kv_cache.errors import KVConfigError

__all__ = ["HOT_ACCESSES", "UNIT", "bucket_counts", "hot_ids", "sample_pass"]

UNIT = 1 << 20  # weight of a block kept with probability 1
HOT_ACCESSES = 64  # an id with about this many accesses is hot (kept in every sample)
HOT_MAX = 1024  # at most this many hot ids (the most accessed)
_DETECT = 1 << 18  # accesses looked at to find the hot ids
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_GOLD = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1
_INF = 1 << 62


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


def _suffix(tree, lane, j, t, sup):
    """Live positions ``>= j`` in ``lane``'s timeline of ``t`` positions, ``sup`` of them
    superseded (marked in the tree, counted below ``j`` by a Fenwick prefix)."""
    below = 0
    i = j
    while i:
        below += tree[lane, i]
        i &= i - 1
    return (t - j) - (sup - below)


def _count_above(nxt, prv, hkey, head, tail, seen, key):
    """Hot ids released after ``key``: walk the list from both ends at once."""
    x = nxt[head]
    y = prv[tail]
    c = 0
    while True:
        if x == tail or hkey[x] <= key:
            return c
        x = nxt[x]
        if y == head or hkey[y] > key:
            return seen - c
        c += 1
        y = prv[y]


def _rank(nxt, prv, head, tail, seen, h):
    """Hot ids above ``h`` on the list: walk from ``h`` both ways at once."""
    x = prv[h]
    y = nxt[h]
    c = 0
    while True:
        if x == head:
            return c
        if y == tail:
            return seen - 1 - c
        c += 1
        x = prv[x]
        y = nxt[y]


def _move(nxt, prv, hkey, h, anchor, key):
    """Hot id ``h`` released at ``key``: unlinked, put right after ``anchor``; 1 if new."""
    if nxt[anchor] == h:  # in place already (a popular chain, again)
        hkey[h] = key
        return 0
    new = 1
    if hkey[h] >= 0:
        nxt[prv[h]] = nxt[h]
        prv[nxt[h]] = prv[h]
        new = 0
    nxt[h] = nxt[anchor]
    prv[h] = anchor
    prv[nxt[anchor]] = h
    nxt[anchor] = h
    hkey[h] = key
    return new


def _hot_depth(tree, w_cold, lane, sup, pkey, tl, hkey, h, nxt, prv, head, tail, seen):
    """Weighted depth of hot id ``h``: cold positions released after it (a binary
    search on the release keys, then the tree) and the hot ids above it."""
    if hkey[h] < 0:
        return _INF
    lo = 0
    hi = tl[lane]
    while lo < hi:
        mid = (lo + hi) >> 1
        if pkey[lane, mid] <= hkey[h]:
            lo = mid + 1
        else:
            hi = mid
    cold = w_cold * _suffix(tree, lane, lo, tl[lane], sup[lane])
    return cold + UNIT * _rank(nxt, prv, head, tail, seen, h)


def _tally(caps, m, full, w, first, acc, req_acc, lane):
    """Add weight ``w`` at the first capacity running-max depth ``m`` hits at (depth
    ``< C x UNIT`` and ``full <= C``; index ``len(caps)``: a miss)."""
    lo = 0
    hi = len(caps)
    while lo < hi:
        mid = (lo + hi) >> 1
        if caps[mid] * UNIT <= m or caps[mid] < full:
            lo = mid + 1
        else:
            hi = mid
    acc[lane, lo] += w
    if first:
        req_acc[lane, lo] += w


def _pass(chunks, bounds, local, starts, fulls, hot_keys, hot_bits, salt, band, top, nb, keep_all,
          q_salt, p_hot, p_first, w_cold, w_hot, w_first, caps, acc, req_acc):  # fmt: skip
    """Kept accesses' weighted depths for ``nb`` samples, accumulated per capacity.

    ``acc[s, j]`` (``req_acc[s, j]``) gets the weight of every looked-up block
    (request's first block) of sample ``s`` that first hits at ``caps[j]``
    (sorted); column ``len(caps)`` collects the misses. Returns the number of
    accesses looked up.
    """
    n_hot = len(hot_keys)
    # hot ids: open addressing over their values (slot -> index), a bit filter in front
    hsize = 16
    while hsize < 4 * n_hot:
        hsize *= 2
    htab = np.full(hsize, -1, dtype=np.int64)
    for h in range(n_hot):
        s = np.int64((_mix(np.uint64(hot_keys[h]), salt) >> np.uint64(20)) & np.uint64(hsize - 1))
        while htab[s] >= 0:
            s = (s + 1) & (hsize - 1)
        htab[s] = h
    bmask = np.uint64(len(hot_bits) * 64 - 1)
    head = n_hot
    tail = n_hot + 1
    nxt = np.full(n_hot + 2, -1, dtype=np.int64)
    prv = np.full(n_hot + 2, -1, dtype=np.int64)
    nxt[head] = tail
    prv[tail] = head
    hkey = np.full(n_hot + 2, -1, dtype=np.int64)
    succ = np.full(n_hot + 1, -1, dtype=np.int64)  # per hot id the hot id after it last time
    seen = 0
    # cold kept ids: open addressing (slot -> [id, value]; id -1: empty), per id its
    # position and sample
    size = 1 << 12
    tab = np.full((size, 2), -1, dtype=np.int64)
    live = 0
    posv = np.zeros(1024, dtype=np.int64)
    lane_of = np.zeros(1024, dtype=np.int64)
    live_l = np.zeros(nb, dtype=np.int64)  # kept ids per sample
    cap_t = 1 << 12
    tree = np.zeros((nb, cap_t + 1), dtype=np.int32)  # per sample: kept ids per position
    owner = np.full((nb, cap_t), -1, dtype=np.int64)
    pkey = np.zeros((nb, cap_t), dtype=np.int64)
    tl = np.zeros(nb, dtype=np.int64)
    sup = np.zeros(nb, dtype=np.int64)  # superseded positions per timeline
    looked = 0
    cur_ids = np.zeros(64, dtype=np.int64)
    cur_k = np.zeros(64, dtype=np.int64)
    run = np.zeros(nb, dtype=np.int64)
    ci = 0
    values = chunks[0]
    for i in range(len(fulls)):
        while i >= bounds[ci + 1]:  # the next chunk of ids
            ci += 1
            values = chunks[ci]
        full = fulls[i]
        a = starts[i]  # over all chunks: release keys grow across them
        off = a - local[i]
        n = 0
        # the request's hot blocks are looked up in one sample (by a hash of the request
        # index), each with probability p_hot (p_first: its first block)
        rq = _mix(np.uint64(i), q_salt)
        qs = np.int64(((rq >> np.uint64(32)) * np.uint64(nb)) >> np.uint64(32))
        rx = _mix(rq, q_salt)  # which hot blocks: independent of the sample drawn from rq
        run[:] = -1
        # the leading hot run is looked up and released at once, in order (first block
        # frontmost): with chained ids the request's later blocks are its descendants,
        # already below it, so no depth looked up in this request changes
        anchor = head
        leading = True
        prev = -1  # the request's previous block, when hot
        pred = -1  # the hot id expected next (succ of prev)
        for k in range(a, a + full):  # classify: hot (id >= 0 marks cold: -1 - hot index)
            v = values[k - off]
            u = np.uint64(0)
            h = -1
            if pred >= 0 and hot_keys[pred] == v:  # the hot id that followed last time
                h = pred
            else:
                u = _mix(np.uint64(v), salt)
                if n_hot and (
                    (hot_bits[(u & bmask) >> np.uint64(6)] >> (u & np.uint64(63))) & np.uint64(1)
                ):
                    s = np.int64((u >> np.uint64(20)) & np.uint64(hsize - 1))
                    while htab[s] >= 0:
                        if hot_keys[htab[s]] == v:
                            h = htab[s]
                            break
                        s = (s + 1) & (hsize - 1)
                if h >= 0 and prev >= 0:
                    succ[prev] = h
            prev = h
            pred = succ[h] if h >= 0 else -1
            if h >= 0:
                if leading:
                    x = rx + np.uint64(k - a) * np.uint64(_GOLD)
                    if x < (p_first if k == a else p_hot):
                        d = _hot_depth(tree, w_cold, qs, sup, pkey, tl, hkey, h, nxt, prv,
                                       head, tail, seen)  # fmt: skip
                        if d > run[qs]:
                            run[qs] = d
                        looked += 1
                        _tally(caps, run[qs], full, w_first if k == a else w_hot, k == a, acc,
                               req_acc, qs)  # fmt: skip
                    seen += _move(nxt, prv, hkey, h, anchor, a + full - 1 - (k - a))
                    anchor = h
                    continue
                code = -1 - h
            else:
                leading = False
                if keep_all:
                    lane = 0
                elif u < top:
                    lane = np.int64(u // np.uint64(band))
                else:
                    continue
                s = np.int64((u >> np.uint64(17)) & np.uint64(size - 1))
                while tab[s, 0] >= 0 and tab[s, 1] != v:
                    s = (s + 1) & (size - 1)
                code = tab[s, 0]
                if code < 0:
                    if live >= len(posv):
                        posv = np.concatenate((posv, np.zeros(len(posv), dtype=np.int64)))
                        lane_of = np.concatenate((lane_of, np.zeros(len(lane_of), dtype=np.int64)))
                    tab[s, 0] = live
                    tab[s, 1] = v
                    code = live
                    posv[live] = -1
                    lane_of[live] = lane
                    live += 1
                    live_l[lane] += 1
                    if 2 * live > size:  # grow the table: rehash
                        size *= 2
                        nt = np.full((size, 2), -1, dtype=np.int64)
                        for q in range(len(tab)):
                            if tab[q, 0] >= 0:
                                r = np.int64(
                                    (_mix(np.uint64(tab[q, 1]), salt) >> np.uint64(17))
                                    & np.uint64(size - 1)
                                )
                                while nt[r, 0] >= 0:
                                    r = (r + 1) & (size - 1)
                                nt[r, 0] = tab[q, 0]
                                nt[r, 1] = tab[q, 1]
                        tab = nt
            if n >= len(cur_ids):
                cur_ids = np.concatenate((cur_ids, cur_ids))
                cur_k = np.concatenate((cur_k, cur_k))
            cur_ids[n] = code
            cur_k[n] = k - a
            n += 1
        if n == 0:
            continue
        # depths against the stack before the request, running max along it, per sample
        for q in range(n):
            c = cur_ids[q]
            j = cur_k[q]
            if c >= 0:
                lane = lane_of[c]
                p = posv[c]
                w = w_cold
                if run[lane] == _INF or p < 0:
                    d = _INF
                else:
                    d = w_cold * _suffix(
                        tree, lane, p + 1, tl[lane], sup[lane]
                    ) + UNIT * _count_above(nxt, prv, hkey, head, tail, seen, pkey[lane, p])
            else:  # a hot block after the leading run (ids not chained)
                lane = qs
                if rx + np.uint64(j) * np.uint64(_GOLD) >= (p_first if j == 0 else p_hot):
                    continue
                w = w_first if j == 0 else w_hot
                d = _hot_depth(tree, w_cold, lane, sup, pkey, tl, hkey, -1 - c, nxt, prv,
                               head, tail, seen)  # fmt: skip
            if d > run[lane]:
                run[lane] = d
            looked += 1
            _tally(caps, run[lane], full, w, j == 0, acc, req_acc, lane)
        # release tail-first: a later block gets a smaller key (the first block the largest)
        if tl.max() + n > cap_t:  # compact the timelines to their live positions
            newcap = max(2 * (live_l.max() + n), 1 << 12)
            ntree = np.zeros((nb, newcap + 1), dtype=np.int32)
            nown = np.full((nb, newcap), -1, dtype=np.int64)
            npk = np.zeros((nb, newcap), dtype=np.int64)
            for ln in range(nb):
                nt = 0
                for p in range(tl[ln]):
                    c = owner[ln, p]
                    if c >= 0:
                        nown[ln, nt] = c
                        npk[ln, nt] = pkey[ln, p]
                        posv[c] = nt
                        nt += 1
                tl[ln] = nt
                sup[ln] = 0
            tree = ntree
            owner = nown
            pkey = npk
            cap_t = newcap
        for q in range(n - 1, -1, -1):
            c = cur_ids[q]
            key = a + full - 1 - cur_k[q]
            if c < 0:  # hot: to the front of the list (after this request's leading run)
                seen += _move(nxt, prv, hkey, -1 - c, anchor, key)
                continue
            lane = lane_of[c]
            p = posv[c]
            if p >= 0:  # its old position is superseded: marked (a new one costs nothing)
                owner[lane, p] = -1
                j = p + 1
                while j <= cap_t:
                    tree[lane, j] += 1
                    j += j & -j
                sup[lane] += 1
            t = tl[lane]
            posv[c] = t
            owner[lane, t] = c
            pkey[lane, t] = key
            tl[lane] = t + 1
    return looked


_jit: dict = {}
_HELPERS = ("_mix", "_suffix", "_count_above", "_rank", "_move", "_hot_depth", "_tally")


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

            # the loop calls the helpers: compile them too, in the loop's own globals
            glb = dict(fn.__globals__)
            for h in _HELPERS:  # leaves first: a helper resolves the ones before it in glb
                code = globals()[h].__code__
                glb[h] = numba.njit(cache=True)(types.FunctionType(code, glb, h))
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


def hot_ids(values: Any, accesses: int = HOT_ACCESSES) -> np.ndarray:
    """Ids with about ``accesses`` accesses or more, at most ``HOT_MAX`` (the most accessed).

    Counted on every ``step``-th entry of ``values`` (an array, or a list of chunks of
    it; ``step`` keeps about
    ``2**18`` entries; 1 on small traces: exact counts), so the set depends
    on the trace only, never on a sample's salt; an id then needs ``accesses /
    step`` hits there, and at least 4.
    """
    parts = [values] if isinstance(values, np.ndarray) else list(values)
    step = max(1, sum(len(p) for p in parts) // _DETECT)
    ids, counts = np.unique(np.concatenate([p[::step] for p in parts]), return_counts=True)
    need = max(4, -(-accesses // step)) if step > 1 else accesses
    hot = counts >= need
    if int(hot.sum()) > HOT_MAX:
        top = np.argsort(-counts, kind="stable")[:HOT_MAX]
        return np.sort(ids[top]).astype(np.int64)
    return ids[hot].astype(np.int64)


def sample_pass(
    values: Any,
    starts: np.ndarray,
    fulls: np.ndarray,
    hot: np.ndarray,
    rate: float,
    salt: int,
    caps: np.ndarray,
    *,
    samples: int = 1,
    hot_rate: float | None = None,
    bounds: Any = None,
    local: Any = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(hit weight per sample and sorted capacity, first-block hit weight likewise,
    accesses looked up)``, weights in blocks (floats, shape ``(samples, len(caps))``).

    ``values``: the flat ids (``starts[i]`` request ``i``'s first), or a list of
    chunks of them, unconcatenated: requests ``bounds[c]:bounds[c + 1]`` read
    chunk ``c`` from ``local[i]`` on, while ``starts`` count over all chunks.
    ``samples`` disjoint hash bands of width ``rate`` (``samples x rate <= 1``)
    in one pass; at ``rate >= 1`` one sample holding every block. ``hot``:
    ids kept in every sample (weight 1); each request's hot blocks are looked
    up in one sample (by a hash of the request index), each with probability
    ``hot_rate`` (default ``2 x rate``; a request's first block ``4 x
    hot_rate``), weighted by the inverse.

    Raises:
        KVConfigError: the bands do not fit (``samples x rate > 1``).
    """
    if isinstance(values, np.ndarray):
        values, bounds, local = [values], np.asarray([0, len(fulls)]), starts
    chunks: Any = list(values)
    keep_all = rate >= 1
    nb = 1 if keep_all else int(samples)
    if not keep_all and nb * rate > 1 + 1e-12:
        raise KVConfigError(f"{nb} disjoint bands of rate {rate} do not fit in one scan")
    band = np.uint64(0) if keep_all else np.uint64(min(int(rate * 2.0**64), _MASK // nb))
    hr = min(1.0, 2 * rate if hot_rate is None else hot_rate)
    hf = min(1.0, 4 * hr)
    w_cold = UNIT if keep_all else round(UNIT / rate)
    w_hot = round(UNIT * nb / hr)
    w_first = round(UNIT * nb / hf)
    hot = np.asarray(hot, dtype=np.int64)
    words = 1 << int(np.ceil(np.log2(max(1, 4 * len(hot)))))  # 256 filter bits per hot id
    bits = np.zeros(words, dtype=np.uint64)
    salt_u = np.uint64((salt * _GOLD + 1) & _MASK)
    with np.errstate(over="ignore"):
        u = _mix(hot.astype(np.uint64), salt_u) & np.uint64(words * 64 - 1)
    np.bitwise_or.at(bits, u >> np.uint64(6), np.uint64(1) << (u & np.uint64(63)))
    acc = np.zeros((nb, len(caps) + 1), dtype=np.int64)
    req = np.zeros((nb, len(caps) + 1), dtype=np.int64)
    fn = _kernel("pass", _pass)
    if fn is not _pass:  # compiled: a typed list of read-only arrays
        import numba

        typed = numba.typed.List()
        for c in chunks:
            c = np.asarray(c, dtype=np.int64).view()
            c.flags.writeable = False
            typed.append(c)
        chunks = typed
    with np.errstate(over="ignore"):
        looked = fn(
            chunks,
            np.asarray(bounds, dtype=np.int64),
            np.asarray(local, dtype=np.int64),
            starts,
            fulls,
            hot,
            bits,
            salt_u,
            band,
            np.uint64(int(band) * nb),
            nb,
            keep_all,
            np.uint64(int(salt_u) ^ 0xD1B54A32D192ED03),
            np.uint64(min(int(hr * 2.0**64), _MASK)),
            np.uint64(min(int(hf * 2.0**64), _MASK)),
            w_cold,
            w_hot,
            w_first,
            np.asarray(caps, dtype=np.int64),
            acc,
            req,
        )
    hit = np.cumsum(acc, axis=1)[:, :-1] / UNIT
    first = np.cumsum(req, axis=1)[:, :-1] / UNIT
    return hit, first, int(looked)
