"""One-pass LRU miss-ratio curve: sequential-LRU hit counts at every capacity.

The sequential replay (``sim.replay.replay_sequential`` with ``policy="lru"``)
serves each request, then releases its blocks tail-first, so after request
``i`` with blocks ``h0 h1 ... hn-1`` the LRU order (most recent first) reads::

    h0  h1  ...  hn-1  | the blocks of earlier requests, in their previous order
    ^ released last       (minus h0..hn-1)

Call this sequence the *global recency stack*: it depends on the trace only,
not on the capacity. By induction over requests, a pool of ``C`` blocks holds
exactly the top ``C`` entries of the stack after every request, provided that

* ``C >= max_request_blocks`` (no request is skipped as too large), and
* block ids are *prefix-chained* (an id always follows the same id, as
  Mooncake hash ids do): then a parent is always above its child in the stack,
  the cache is prefix-closed, a request's missing blocks are never cached
  elsewhere, and every block a request names ends up cached after it.

Inductive step: a request with ``k`` leading hits and ``n`` blocks allocates
``n - k`` blocks, taking free blocks first, then the least recent evictable
ones; what remains is its ``n`` blocks plus the most recent ``C - n`` others,
which is the top ``C`` of the new stack. Hence a block of a request hits at
capacity ``C`` iff its *stack depth* before the request (0 = most recent)
is ``< C``; the leading-run rule is applied by taking the running maximum of
depths along the request (with chained ids depths already increase along a
request, so the maximum changes nothing there). A block never seen before
has infinite depth (a cold miss).

Depths come from one pass with a Fenwick tree: every block access gets a
position (the request's last block the smallest, its first block the
largest, matching the release order); a block's depth is the number of
positions after its own latest position that are still the latest position
of their block. Positions are handed out in increasing order, so the tree only
records *superseded* positions: depth = (positions after p) - (superseded
positions after p). First accesses cost no tree operation, a re-access one
prefix query and one point update: O(total blocks x log total blocks).

Below ``max_request_blocks`` the figures are an approximation, neither a
lower nor an upper bound: requests larger than ``C`` count as misses as in
the replay, but their blocks still enter the recency stack here, whereas a
direct replay skips them entirely (they cache nothing and refresh nothing).
``MRCResult.hit_ratios`` marks those rows ``exact=False``. For traces whose
ids are not prefix-chained (``MRCResult.prefix_chained`` is False) the
one-pass figures are the stack model's, not necessarily the replay's.

Result type: ``lru_mrc`` returns an ``MRCResult``, the *curve object*. Its
``hit_ratios``/``curve`` give the whole curve as one DataFrame (the fast path,
one ``searchsorted`` per capacity); ``result(C)`` and ``results([C, ...])``
give the same ``sim.result.SimResult`` every other mode returns (``records``
one row per request, ``summary()`` with the names and plain JSON types of
``replay_opt``'s, ``config``), with ``mode="mrc"``, ``policy="lru"`` and no
clock. Per-request figures: ``hit_blocks`` is the count of the request's blocks
with depth ``< C``, ``rejected`` a request larger than ``C``, and
``evicted_blocks = min(C, D_before) + allocated - min(C, D_after)`` where ``D``
counts the distinct blocks seen so far (the pool holds the top ``min(C, D)``
entries of the stack). ``config["exact"]`` says whether they equal a direct
replay's (see above).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sagellm_kv_cache.errors import KVInvalidInputError

from .mrc_kernel import INF
from .ratios import block_hit_ratio, hit_ratios, request_hit_ratio, token_hit_ratio

__all__ = ["MRCResult", "lru_mrc"]

_INF = INF  # depth of a cold miss: above every capacity
_REQUIRED = ("input_length", "block_hashes")


@dataclass
class MRCResult:
    """Stack depths of one trace and the sequential-LRU hit ratios they give at any capacity.

    Ratios have the definitions of ``sim.replay.ReplayResult``:
    ``token_hit_ratio`` = hit blocks x block_size / sum of input_length,
    ``block_hit_ratio`` = hit blocks / full blocks, ``request_hit_ratio`` =
    requests with at least one hit block / requests.
    """

    block_size: int
    num_requests: int
    full_blocks: int  # sum over requests of input_length // block_size
    prompt_tokens: int  # sum of input_length
    max_request_blocks: int  # largest request in full blocks; exact for capacities >= this
    distinct_blocks: int  # distinct ids among full blocks
    infinite_capacity_blocks: int  # what replay_sequential(table, None) uses: distinct ids
    prefix_chained: bool  # every id always follows the same id (exactness needs it)
    # per full block, in trace order: running-max stack depth (_INF: cold miss)
    _depths: np.ndarray = field(repr=False)
    # per request: running-max depth of its first block (_INF: none or cold), its full blocks
    _first_depths: np.ndarray = field(repr=False)
    _request_blocks: np.ndarray = field(repr=False)
    _sorted_depths: np.ndarray = field(repr=False)
    _sorted_first_depths: np.ndarray = field(repr=False)
    # per request: distinct full-block ids seen up to and including it (stack size after it)
    _distinct_through: np.ndarray = field(repr=False)
    _table: Any = field(repr=False)  # the trace table (records: ids, arrivals, lengths)

    @property
    def _request_blocks_per_block(self) -> np.ndarray:
        """Per full block: its request's number of full blocks (made when needed:
        only capacities below ``max_request_blocks`` use it)."""
        return np.repeat(self._request_blocks, self._request_blocks)

    # -- per-block view -------------------------------------------------------
    @property
    def stack_depths(self) -> np.ndarray:
        """Per full block in trace order: the running-max stack depth, -1 for a cold miss.

        The block hits at capacity ``C >= max_request_blocks`` iff ``0 <= depth < C``.
        """
        d = self._depths.copy()
        d[d == _INF] = -1
        return d

    # -- counts ---------------------------------------------------------------
    def _capacities(self, capacities, model_shape: Any = None) -> np.ndarray:
        out = []
        for c in capacities:
            if c is None:
                out.append(self.infinite_capacity_blocks)
                continue
            if isinstance(c, str):  # the one capacity grammar: "5.12Mt", "10%", "40GiB", "inf"
                out.append(self._resolve(c, model_shape)[0])
                continue
            if isinstance(c, bool) or not isinstance(c, int | np.integer):
                raise KVInvalidInputError(
                    f"capacity must be an integer, capacity text or None, got {c!r}"
                )
            if c < 1:
                raise KVInvalidInputError(f"capacity must be >= 1 block, got {c}")
            out.append(int(c))
        return np.asarray(out, dtype=np.int64)

    def _counts(self, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit blocks, hit requests) at each capacity in ``caps`` (validated)."""
        hit_blocks = np.searchsorted(self._sorted_depths, caps, side="left").astype(np.int64)
        hit_reqs = np.searchsorted(self._sorted_first_depths, caps, side="left").astype(np.int64)
        # below the largest request, requests larger than C are misses (as in the replay)
        small = np.flatnonzero(caps < self.max_request_blocks)
        per_block = self._request_blocks_per_block if len(small) else None
        for i in small:
            c = caps[i]
            hit_blocks[i] = np.count_nonzero((self._depths < c) & (per_block <= c))
            hit_reqs[i] = np.count_nonzero((self._first_depths < c) & (self._request_blocks <= c))
        return hit_blocks, hit_reqs

    def hit_blocks(self, capacities) -> np.ndarray:
        """Hit blocks at each capacity (an int, or None for infinite), as an int64 array."""
        return self._counts(self._capacities(capacities))[0]

    def hit_ratios(self, capacities):
        """Hit ratios at each capacity (blocks, capacity text such as ``"10%"``, or None for
        infinite) as a polars DataFrame.

        Columns: ``capacity_blocks``, ``token_hit_ratio``, ``block_hit_ratio``,
        ``request_hit_ratio``, ``hit_blocks``, ``hit_requests`` and ``exact``
        (``capacity_blocks >= max_request_blocks`` and prefix-chained ids: the
        row equals a direct ``replay_sequential(table, C, "lru")``). Rows in
        the order given.

        Raises:
            KVInvalidInputError: a capacity that is not an integer >= 1, text or None.
            KVConfigError: capacity text that does not parse.
        """
        import polars as pl

        caps = self._capacities(capacities)
        hit_blocks, hit_reqs = self._counts(caps)
        ratios = self._ratios(hit_blocks, hit_reqs)
        return pl.DataFrame(
            {
                "capacity_blocks": pl.Series(caps, dtype=pl.Int64),
                **{k: pl.Series(v, dtype=pl.Float64) for k, v in ratios.items()},
                "hit_blocks": pl.Series(hit_blocks, dtype=pl.Int64),
                "hit_requests": pl.Series(hit_reqs, dtype=pl.Int64),
                "exact": pl.Series(
                    (caps >= self.max_request_blocks) & self.prefix_chained, dtype=pl.Boolean
                ),
            }
        )

    def breakpoints(self) -> np.ndarray:
        """Every capacity at which the curve changes value, ascending.

        The curve is a step function: constant from one breakpoint up to the
        next; the last breakpoint's value is the infinite-capacity one. A
        block with depth ``d`` starts to hit at ``C = d + 1``; below
        ``max_request_blocks`` a request's blocks may also start to count at
        ``C`` = its size.
        """
        finite = self._sorted_depths[self._sorted_depths < _INF]
        pts = np.concatenate([finite + 1, self._request_blocks[self._request_blocks > 0]])
        pts = np.unique(pts)
        return pts[pts >= 1] if len(pts) else np.asarray([1], dtype=np.int64)

    def curve(self):
        """``hit_ratios`` at every breakpoint (see ``breakpoints``)."""
        return self.hit_ratios([int(c) for c in self.breakpoints()])

    # -- one SimResult per capacity ------------------------------------------
    def _resolve(self, spec: str, model_shape: Any) -> tuple[int, dict]:
        from .simulate import resolve_blocks

        blocks, info = resolve_blocks(spec, self._table, self.block_size, model_shape)
        return (self.infinite_capacity_blocks if blocks is None else int(blocks)), info

    def result(self, capacity: Any = None, *, model_shape: Any = None):
        """The ``SimResult`` a sequential LRU replay at ``capacity`` gives, from the curve.

        Args:
            capacity: blocks (int), capacity text (``"5.12Mt"``, ``"10%"``,
                ``"40GiB"`` with ``model_shape``, ``"inf"``) or None (infinite).
            model_shape: ``ModelShape`` or preset name, for byte capacities.

        Returns:
            a ``SimResult`` (``mode="mrc"``, ``policy="lru"``, ``clock=None``);
            ``config["exact"]`` is True when it equals ``replay_sequential(table,
            capacity, "lru")`` request for request (module docstring).

        Raises:
            KVInvalidInputError: a capacity that is not an integer >= 1, text or None.
            KVConfigError: capacity text that does not parse.
        """
        return self.results([capacity], model_shape=model_shape)[0]

    def results(self, capacities, *, model_shape: Any = None) -> list:
        """``result(C)`` for each capacity, in the order given (validated first)."""
        infos = []
        caps = []
        for c in capacities:
            if isinstance(c, str):
                blocks, info = self._resolve(c, model_shape)
            else:
                blocks = int(self._capacities([c])[0])
                info = {"spec": "inf" if c is None else str(blocks), "unit": "blocks"}
                info.update(label=info["spec"], blocks=blocks)
            caps.append(blocks)
            infos.append(info)
        return [self._sim_result(c, info) for c, info in zip(caps, infos)]

    def _sim_result(self, cap: int, info: dict):
        from .result import BlockCounts, build_result

        req = self._request_blocks
        n = len(req)
        rejected = (req > 0) & (req > cap)
        flags = self._depths < cap
        if cap < self.max_request_blocks:
            flags &= self._request_blocks_per_block <= cap
        cs = np.zeros(len(flags) + 1, dtype=np.int64)
        np.cumsum(flags, out=cs[1:])
        ends = np.cumsum(req)
        hit = cs[ends] - cs[ends - req]
        allocated = np.where(rejected, 0, req - hit)
        used_after = np.minimum(cap, self._distinct_through)
        used_before = np.concatenate([[0], used_after[:-1]]) if n else used_after
        evicted = np.maximum(used_before + allocated - used_after, 0)
        exact = bool(cap >= self.max_request_blocks and self.prefix_chained)
        return build_result(
            self._table,
            mode="mrc",
            policy="lru",
            capacity_blocks=cap,
            block_size=self.block_size,
            blocks=BlockCounts(req, hit, allocated, evicted, rejected),
            evictions=int(evicted.sum()),
            hits_per_tier={"gpu": hit},
            config={
                "mode": "mrc",
                "policy": "lru",
                "capacity": info,
                "capacity_blocks": cap,
                "block_size": self.block_size,
                "exact": exact,
            },
        )

    def _ratios(self, hit_blocks: Any, hit_requests: Any) -> dict[str, Any]:
        return hit_ratios(
            hit_blocks,
            hit_requests,
            block_size=self.block_size,
            prompt_tokens=self.prompt_tokens,
            full_blocks=self.full_blocks,
            num_requests=self.num_requests,
        )

    # -- infinite capacity ----------------------------------------------------
    @property
    def infinite_hit_blocks(self) -> int:
        return int(np.count_nonzero(self._depths < _INF))

    @property
    def infinite_hit_requests(self) -> int:
        return int(np.count_nonzero(self._first_depths < _INF))

    @property
    def infinite_token_hit_ratio(self) -> float:
        return token_hit_ratio(self.infinite_hit_blocks, self.block_size, self.prompt_tokens)

    @property
    def infinite_block_hit_ratio(self) -> float:
        return block_hit_ratio(self.infinite_hit_blocks, self.full_blocks)

    @property
    def infinite_request_hit_ratio(self) -> float:
        return request_hit_ratio(self.infinite_hit_requests, self.num_requests)

    def infinite(self) -> dict:
        """The infinite-capacity (every re-use hits) ratios and hit blocks."""
        return {
            "capacity_blocks": self.infinite_capacity_blocks,
            **self._ratios(self.infinite_hit_blocks, self.infinite_hit_requests),
            "hit_blocks": self.infinite_hit_blocks,
        }


def _check_table(table) -> None:
    cols = getattr(table, "columns", None)
    if cols is None:
        raise KVInvalidInputError(f"expected a canonical trace table, got {type(table).__name__}")
    missing = [c for c in _REQUIRED if c not in cols]
    if missing:
        raise KVInvalidInputError(f"trace table lacks column(s) {missing}; has {list(cols)}")


def lru_mrc(table, *, progress: bool = False, kernel: str = "auto") -> MRCResult:
    """Sequential-LRU hit counts at every capacity from one pass over ``table``.

    Args:
        table: a canonical trace table (``traces`` package docstring); only
            ``input_length``, ``block_hashes`` and ``block_size`` are read, as flat
            columns (``traces.columnar``: no per-request Python lists).
        progress: a tqdm bar over the pass's three phases (ids, depths, sorting).
        kernel: ``"auto"`` (numba when installed, else Python), ``"numba"`` or
            ``"python"`` (the reference); all give identical depths.

    Returns:
        An ``MRCResult`` (the curve object); ``m.hit_ratios([1000, 10000, None])``
        gives the figures ``replay_sequential(table, C, "lru")`` would, exactly for
        ``C >= m.max_request_blocks`` on prefix-chained ids (module docstring), and
        ``m.result(C)`` / ``m.results([...])`` the ``SimResult`` of each capacity.

    Memory: the table, plus about 8 (depths) + 8 (sorted depths) bytes per full
    block kept, and while the pass runs 4 + 4 (dense ids, tree) per block and
    8 per distinct id.

    Raises:
        KVInvalidInputError: ``table`` lacks a needed column.
    """
    from traces.columnar import hash_arrays

    from .mrc_kernel import dense_ids, stack_depths

    _check_table(table)
    values, offsets = hash_arrays(table)
    lengths = table["input_length"].to_numpy().astype(np.int64, copy=False)
    n = len(lengths)
    block_size = int(table["block_size"][0]) if n and "block_size" in table.columns else 512
    req_blocks = lengths // block_size
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=3, desc="lru mrc", unit="phase")
    ids, num_ids = dense_ids(values)  # every id, the partial tail's too (infinite capacity)
    partial = np.flatnonzero(offsets[1:] - offsets[:-1] > req_blocks)
    if len(partial):  # drop each partial tail id: the pass sees full blocks only
        keep = np.ones(len(ids), dtype=bool)
        keep[offsets[1:][partial] - 1] = False
        ids = ids[keep]
        del keep
    if bar is not None:
        bar.update(1)
    d_arr, seen, chained = stack_depths(ids, req_blocks, num_ids, kernel=kernel)
    del ids
    if bar is not None:
        bar.update(1)
    total = int(req_blocks.sum())
    first = np.full(n, _INF, dtype=np.int64)
    has = req_blocks > 0
    starts = np.concatenate([[0], np.cumsum(req_blocks)[:-1]]) if n else req_blocks
    first[has] = d_arr[starts[has]]
    sorted_depths = np.sort(d_arr)
    if bar is not None:
        bar.update(1)
        bar.close()
    return MRCResult(
        block_size=block_size,
        num_requests=n,
        full_blocks=total,
        prompt_tokens=int(lengths.sum()),
        max_request_blocks=int(req_blocks.max()) if n else 0,
        distinct_blocks=int(seen[-1]) if n else 0,
        infinite_capacity_blocks=max(1, num_ids),
        prefix_chained=chained,
        _depths=d_arr,
        _first_depths=first,
        _request_blocks=req_blocks,
        _sorted_depths=sorted_depths,
        _sorted_first_depths=np.sort(first),
        _distinct_through=seen,
        _table=table,
    )
