"""Belady's offline optimum for sequential replay, prefix-aware: the bound online policies chase.

Model (the library's semantics, as in ``sim.replay.replay_sequential``):

* requests are served one at a time in trace order; a request's blocks are its
  full blocks (the first ``input_length // block_size`` ids), one block per id;
* demand caching: a request hits its leading run of cached blocks, every
  other block of it is allocated, and after the request all its blocks are
  cached; while it is served, its blocks are held (not evictable);
* a pool of ``capacity_blocks`` blocks; an allocation takes free blocks first
  and evicts only the shortfall; a request larger than the pool counts as a
  miss and caches nothing (the pool is unchanged).

Policy: when blocks must be evicted, evict the evictable block whose next use
(the index of the next request that names it, among requests that fit the
pool) is furthest away; blocks never used again go first; ties go to the
deeper block (its position in its request), so a child leaves before its
parent. Next uses come from one backward pass; the evictable set is a heap
keyed by (next use, depth) with lazy invalidation: a block pushes a fresh
entry each time it is used, older entries are skipped when popped. Every
event is O(log n).

Why this upper-bounds every online policy under these semantics (ids
prefix-chained, as in Mooncake traces: an id always follows the same id):

1. Relaxation. For any policy, let ``S`` be the cached set before a request
   ``R``. The library's hits are a leading run, so they are at most
   ``|R & S|``; its end state is ``(S - evicted) | R``. A *relaxed* policy that
   counts ``|R & S|`` hits, loads only ``R - S`` and evicts ``evicted - R``
   reaches the same end state within the same capacity, so the best relaxed
   hit count bounds every library policy's.
2. Belady is optimal for the relaxed problem (demand paging where a request
   names several pages that are held together). Exchange argument: if some
   optimal schedule evicts ``x`` where Belady evicts ``y`` (``next(y) >=
   next(x)``), swap the roles of ``x`` and ``y`` until ``next(x)``; neither is
   held before then, so the swapped schedule is feasible, it hits ``x`` at
   ``next(x)`` where the other missed, and from then on it differs by at most
   one block, which can cost it at most that one hit back. Lazy eviction (only
   the shortfall) loses nothing against eager eviction.
3. Belady's cache stays prefix-closed: a request naming a child names its
   parent, so a parent's next use is never after its child's, and on equal
   next uses the child is evicted first; blocks of the request being served
   have every ancestor in the request too. In a prefix-closed cache the leading
   run is ``R & S``, so Belady's library hits equal its relaxed hits, the
   maximum.

Hence ``replay_opt(table, C).hit_blocks >= replay_sequential(table, C, p).hit_blocks``
for every policy ``p`` and every ``C``, and equals the infinite-capacity
figure when nothing needs evicting. With ids that are not prefix-chained the
replay still runs (cached blocks beyond the leading run are held and kept) but
the bound argument does not apply.
"""

from __future__ import annotations

import heapq

import numpy as np

from sagellm_kv_cache.errors import KVInvalidInputError
from traces.columnar import hash_view

from .result import SimResult

__all__ = ["replay_opt"]


def replay_opt(
    table, capacity_blocks: int | str | None, *, progress: bool = False, model_shape=None
) -> SimResult:
    """Belady's optimal sequential replay of ``table`` at ``capacity_blocks`` (None: infinite).

    Args:
        table: a canonical trace table (``traces`` package docstring).
        capacity_blocks: pool size in blocks, or any capacity text ``sim.config``
            reads (``"5.12Mt"``, ``"10%"``, ``"40GiB"`` with ``model_shape``); None
            uses as many blocks as the trace has distinct ids, as
            ``replay_sequential`` does (nothing is ever evicted).
        progress: show a tqdm progress bar over requests.

    Returns:
        A ``SimResult`` with ``policy="opt"`` and the same fields and
        records as ``replay_sequential`` (no timing: OPT has no clock).

    Raises:
        KVInvalidInputError: ``capacity_blocks`` is not an integer >= 1 or None,
            or ``table`` lacks a needed column.
    """
    cols = getattr(table, "columns", None)
    if cols is None or "block_hashes" not in cols or "input_length" not in cols:
        raise KVInvalidInputError(
            "expected a canonical trace table with block_hashes and input_length columns"
        )
    if isinstance(capacity_blocks, str):  # any capacity unit: "5.12Mt", "10%", "40GiB", "inf"
        from .simulate import resolve_blocks

        bs = int(table["block_size"][0]) if len(table) and "block_size" in cols else 512
        capacity_blocks = resolve_blocks(capacity_blocks, table, bs, model_shape)[0]
    if capacity_blocks is not None and (
        isinstance(capacity_blocks, bool)
        or not isinstance(capacity_blocks, int | np.integer)
        or capacity_blocks < 1
    ):
        raise KVInvalidInputError(
            f"capacity_blocks must be an integer >= 1 or None, got {capacity_blocks!r}"
        )
    hashes_col = hash_view(table)  # flat int ids: a request's list made when it is read
    lengths = table["input_length"].to_list()
    n = len(lengths)
    block_size = int(table["block_size"][0]) if n and "block_size" in cols else 512
    if capacity_blocks is None:
        capacity_blocks = max(1, table["block_hashes"].explode().drop_nulls().n_unique())
    cap = int(capacity_blocks)

    # dense ids and the requests that fit the pool
    dense: dict = {}
    reqs: list[list[int] | None] = [None] * n
    repeats = set()  # requests naming an id twice (ids not prefix-chained)
    fulls = [length // block_size for length in lengths]
    for i in range(n):
        full = fulls[i]
        if full and full <= cap:
            us = [dense.setdefault(h, len(dense)) for h in hashes_col[i][:full]]
            reqs[i] = us
            if len(set(us)) != full:
                repeats.add(i)
    num_ids = max(1, len(dense))

    # backward pass: next use (request index) of every block occurrence; never = n
    never = n
    last = [never] * num_ids
    next_use: list[list[int] | None] = [None] * n
    for i in range(n - 1, -1, -1):
        us = reqs[i]
        if us is None:
            continue
        next_use[i] = [last[u] for u in us]
        for u in us:
            last[u] = i

    # heap key: larger (next use, depth, id) = better victim; stored negated for heapq
    depth_span = max(fulls, default=0) + 1
    id_span = num_ids
    in_cache = bytearray(num_ids)
    cur_use = [-1] * num_ids  # next use recorded by the block's latest heap entry
    heap: list[int] = []
    push, pop = heapq.heappush, heapq.heappop
    used = 0
    total_evictions = 0

    hit_arr = np.zeros(n, dtype=np.int64)
    full_arr = np.zeros(n, dtype=np.int64)
    evict_arr = np.zeros(n, dtype=np.int64)
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"replay opt @ {cap} blocks", unit="req")
    for i in it:
        full = fulls[i]
        if not full:
            continue
        full_arr[i] = full
        us = reqs[i]
        if us is None:  # larger than the pool: a miss, nothing cached
            continue
        k = 0
        for u in us:
            if not in_cache[u]:
                break
            k += 1
        if i in repeats:
            need = len({u for u in us[k:] if not in_cache[u]})
        else:
            need = 0
            for u in us[k:]:
                if not in_cache[u]:
                    need += 1
        shortfall = need - (cap - used)
        if shortfall > 0:
            evict_arr[i] = shortfall
            total_evictions += shortfall
            while shortfall:
                key = -pop(heap)
                u = key % id_span
                use = key // id_span // depth_span
                if not in_cache[u] or cur_use[u] != use:
                    continue  # stale entry
                # every evictable block's next use is > i; only held blocks have use == i
                assert use != i, "OPT tried to evict a block of the request being served"
                in_cache[u] = 0
                shortfall -= 1
            used -= evict_arr[i]
        nxt = next_use[i]
        for j, u in enumerate(us):
            if not in_cache[u]:
                in_cache[u] = 1
                used += 1
            use = nxt[j]
            if cur_use[u] != use:
                cur_use[u] = use
                push(heap, -((use * depth_span + j) * id_span + u))
        hit_arr[i] = k

    from .result import BlockCounts, build_result

    rejected = np.asarray([bool(fulls[i]) and reqs[i] is None for i in range(n)], dtype=bool)
    return build_result(
        table,
        mode="opt",
        policy="opt",
        capacity_blocks=cap,
        block_size=block_size,
        blocks=BlockCounts(
            full_arr, hit_arr, np.where(rejected, 0, full_arr - hit_arr), evict_arr, rejected
        ),
        evictions=total_evictions,
        config={"mode": "opt", "policy": "opt", "capacity_blocks": cap, "block_size": block_size},
    )
