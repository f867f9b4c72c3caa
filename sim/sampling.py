"""Prefix-aware spatial sampling: curves and replays of a trace's sample, with their spread.

Curves default to key ``"stack"`` (``sim.sampling_kernel``): in the
sequential-LRU model a block hits iff its stack depth is below the capacity,
and tail-first release keeps every parent above its child, so the prefix rule
needs no whole chains: blocks are sampled by a salted hash of their id,
hot blocks (ids with many accesses) are kept in every sample, and each depth
is estimated as the Horvitz-Thompson weight of the kept distinct blocks above
it, at full scale (the same as SHARDS' capacity scaled by the rate). The
``samples`` samples are disjoint bands of one hash, drawn in one scan of the
ids that hashes every id once and does nothing else for ids outside every
band. Measured (``benchmarks/bench_scale.py``, 30M-block synthetic trace, 1%
of it as 4 bands of 0.25%): token-hit MAE 0.0015 against exact at 20x-30x
less CPU time, where the request keys below give 0.17-0.21. Replays keep
whole requests, and so do curves with those keys:

a replay sample keeps or drops whole *requests*, keyed on

* ``"root"``: the request's chain root, its first block hash (every request
  that shares any block with another shares its first block, so chains stay
  whole), or
* ``"session"``: the request's ``session_id`` (a conversation's turns stay
  together; blocks shared across sessions, such as system prompts, are kept
  with each sampled session).

A key is kept when a salted 64-bit mix of it falls under ``rate x 2**64``
(fixed rate), or when it is among the ``size`` keys with the smallest mix
(fixed size: ``rate`` is then ``size / distinct keys``). The sample is replayed
at the capacity scaled by the rate (``max(1, round(C x rate))`` blocks), and its
hit ratios estimate the whole trace's at ``C``.

Error estimate: ``samples`` independent samples (salts ``seed .. seed +
samples - 1``); every figure is reported as the mean over them with its
spread (the sample standard deviation, 0 for one sample) beside it. Exact
(``sim.mrc.lru_mrc``, ``simulate``) stays the default everywhere; sampling is
asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sagellm_kv_cache.errors import KVConfigError

from .ratios import hit_ratios

__all__ = ["KEYS", "SampleSpec", "sample_table", "sampled_curve", "sampled_replay"]

KEYS = ("stack", "root", "session")
_RATIOS = ("token_hit_ratio", "block_hit_ratio", "request_hit_ratio")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class SampleSpec:
    """How to sample: ``rate`` (0 < rate <= 1) or ``size`` (keys kept), the key, how many
    independent samples, and the first salt."""

    rate: float | None = 0.01
    size: int | None = None
    key: str | None = None  # None: "stack" for curves, "root" for replays
    samples: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.key is not None and self.key not in KEYS:
            raise KVConfigError(f"sample key must be one of {KEYS}, got {self.key!r}")
        if self.size is not None:
            if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
                raise KVConfigError(f"sample size must be an int >= 1, got {self.size!r}")
        elif not isinstance(self.rate, int | float) or isinstance(self.rate, bool):
            raise KVConfigError(f"sample rate must be a number in (0, 1], got {self.rate!r}")
        elif not 0 < self.rate <= 1:
            raise KVConfigError(f"sample rate must be in (0, 1], got {self.rate!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise KVConfigError(f"samples must be an int >= 1, got {self.samples!r}")

    @classmethod
    def parse(cls, text: str) -> SampleSpec:
        """``"1%"``, ``"0.01"``, ``"1%:session"``, ``"size=5000"``, ``"1%:root:8"``
        (rate or ``size=N``, then optionally the key and the number of samples)."""
        parts = [p.strip() for p in str(text).split(":")]
        try:
            head = parts[0]
            if head.startswith("size="):
                kw: dict[str, Any] = {"size": int(head[5:]), "rate": None}
            else:
                kw = {"rate": float(head[:-1]) / 100 if head.endswith("%") else float(head)}
            if len(parts) > 1 and parts[1]:
                kw["key"] = parts[1]
            if len(parts) > 2:
                kw["samples"] = int(parts[2])
        except ValueError:
            raise KVConfigError(
                f"cannot read sample spec {text!r} (e.g. '1%', '1%:session:4', 'size=5000')"
            ) from None
        return cls(**kw)


def _mix(keys: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of ``keys`` xor a salt: a uniform 64-bit value per key."""
    with np.errstate(over="ignore"):
        x = keys.astype(np.uint64) ^ (np.uint64(salt + 1) * _GOLDEN)
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _keys(table: Any, key: str) -> np.ndarray:
    """The sampling key of each request (int64)."""
    if key == "session":
        if "session_id" not in table.columns:
            raise KVConfigError("key='session' needs a session_id column (this trace has none)")
        if table["session_id"].null_count():
            raise KVConfigError("key='session': some requests have no session_id; use key='root'")
        return table["session_id"].hash(seed=0).to_numpy().view(np.int64)
    from traces.columnar import hash_arrays

    values, offsets = hash_arrays(table)
    has = offsets[1:] > offsets[:-1]
    roots = np.zeros(len(offsets) - 1, dtype=np.int64)
    roots[has] = values[offsets[:-1][has]]
    return roots


def sample_table(table: Any, spec: SampleSpec, salt: int) -> tuple[Any, float]:
    """``(the sampled rows of table, the sampling rate)`` for one salt (whole requests:
    key ``"root"`` or ``"session"``; ``None`` means ``"root"``).

    Raises:
        KVConfigError: key ``"stack"`` (it samples blocks, not requests: curves only).
    """
    if spec.key == "stack":
        raise KVConfigError("key='stack' samples blocks, not requests: use it for curves only")
    keys = _keys(table, spec.key or "root")
    mixed = _mix(keys, salt)
    if spec.size is None:
        rate = float(spec.rate)  # type: ignore[arg-type]
        threshold = np.uint64(min(int(rate * 2.0**64), 2**64 - 1))
        keep = mixed < threshold if rate < 1 else np.ones(len(keys), dtype=bool)
    else:
        distinct = np.unique(mixed)
        if spec.size >= len(distinct):
            return table, 1.0
        cut = np.partition(distinct, spec.size - 1)[spec.size - 1]
        keep = mixed <= cut
        rate = spec.size / len(distinct)
    import polars as pl

    return table.filter(pl.Series(keep)), rate


def _scaled(capacity: int, rate: float) -> int:
    return max(1, round(capacity * rate))


def _aggregate(rows: list[dict], capacities: list) -> Any:
    """Mean and spread of each ratio per capacity over the samples' rows."""
    import polars as pl

    df = pl.DataFrame(rows)
    agg = [pl.col("capacity_blocks").first()]
    for r in _RATIOS:
        agg += [pl.col(r).mean(), pl.col(r).std(ddof=1).fill_null(0.0).alias(f"{r}_spread")]
    agg += [pl.col("rate").mean(), pl.len().alias("samples")]
    out = df.group_by("row", maintain_order=True).agg(agg).drop("row")
    return out.with_columns(pl.col("samples").cast(pl.Int64))


def sampled_curve(table: Any, capacities: list, spec: SampleSpec | None = None) -> Any:
    """The sequential-LRU curve from samples of ``table``.

    Key ``"stack"`` (the default): stratified block sampling with weighted
    stack depths (``sim.sampling_kernel``): hot blocks exact, the rest kept by
    a salted hash of the block id at the rate, depths estimated at full scale,
    so no capacity is scaled and no request is too large. With ``samples x
    rate <= 1`` the samples are disjoint hash bands drawn in one scan (so
    ``SampleSpec(rate=0.0025, samples=4)`` looks at 1% of the ids in all);
    otherwise one scan per sample, each with its own salt. Keys ``"root"``
    and ``"session"``: ``sim.mrc`` on each sampled table at the scaled
    capacity.

    Args:
        table: a canonical trace table.
        capacities: capacities of the whole trace, in blocks (ints).
        spec: the sampling (default: 1% by block stack, 4 samples).

    Returns:
        a polars DataFrame, one row per capacity in the order given:
        ``capacity_blocks`` and, for each of ``token_hit_ratio``,
        ``block_hit_ratio``, ``request_hit_ratio``, the mean over samples and
        its ``*_spread`` (one sample's standard deviation: the mean's error is
        about ``spread / sqrt(samples)``); ``rate`` (the rate of one sample)
        and ``samples``.

    Raises:
        KVConfigError: a bad spec or capacity.
    """
    spec = spec or SampleSpec()
    caps = _check_caps(capacities)
    if spec.key in (None, "stack"):
        return _stack_curve(table, caps, spec)
    from .mrc import lru_mrc

    rows = []
    for s in range(spec.samples):
        sample, rate = sample_table(table, spec, spec.seed + s)
        m = lru_mrc(sample)
        df = m.hit_ratios([_scaled(c, rate) for c in caps])
        for j, c in enumerate(caps):
            rows.append({"row": j, "capacity_blocks": c, "rate": rate} | _ratios(df, j))
    return _aggregate(rows, caps)


def _stack_curve(table: Any, caps: list[int], spec: SampleSpec) -> Any:
    """The ``"stack"`` estimate (``sampled_curve``'s frame): one scan of the ids for all
    samples (disjoint hash bands) when ``samples x rate <= 1``."""
    from .sampling_kernel import bucket_counts, hot_ids, sample_pass

    chunks, bounds, local, offsets = _id_chunks(table)
    lengths = table["input_length"].to_numpy().astype(np.int64, copy=False)
    n = len(lengths)
    block_size = int(table["block_size"][0]) if n and "block_size" in table.columns else 512
    fulls = lengths // block_size
    starts = np.ascontiguousarray(offsets[:-1], dtype=np.int64)
    kw: dict[str, Any] = {"bounds": bounds, "local": local}
    total = int(fulls.sum())
    if spec.size is None:
        rate = float(spec.rate)  # type: ignore[arg-type]
    else:  # fixed size: that many blocks of the distinct ones (linear-counting estimate)
        bits = int(np.clip(np.ceil(np.log2(max(total, 1) / 4)), 10, 22))
        counts = sum(
            bucket_counts(c, local[lo:hi], fulls[lo:hi], bits)
            for c, lo, hi in zip(chunks, bounds[:-1], bounds[1:])
        )
        empty = max(int(np.count_nonzero(counts == 0)), 1)
        distinct = max(len(counts) * np.log(len(counts) / empty), 1.0)
        rate = min(1.0, spec.size / distinct)
    order = np.argsort(caps, kind="stable")
    sorted_caps = np.asarray(caps, dtype=np.int64)[order]
    if rate >= 1:  # every sample is the whole trace: one exact pass, no spread
        hit, req_hit, _ = sample_pass(chunks, starts, fulls, _NO_HOT, 1.0, 0, sorted_caps, **kw)
    else:
        hot = hot_ids(chunks)
        if spec.samples * rate <= 1:  # disjoint bands of one salt: one scan
            hit, req_hit, _ = sample_pass(
                chunks, starts, fulls, hot, rate, spec.seed, sorted_caps, samples=spec.samples, **kw
            )
        else:  # bands overlap: one scan per sample, each with its own salt
            parts = [
                sample_pass(chunks, starts, fulls, hot, rate, spec.seed + s, sorted_caps, **kw)
                for s in range(spec.samples)
            ]
            hit = np.concatenate([p[0] for p in parts])
            req_hit = np.concatenate([p[1] for p in parts])
    back = np.empty_like(hit)
    back_req = np.empty_like(req_hit)
    back[:, order] = hit
    back_req[:, order] = req_hit
    prompt = int(lengths.sum())
    per_sample = hit_ratios(
        back,
        back_req,
        block_size=block_size,
        prompt_tokens=prompt,
        full_blocks=total,
        num_requests=n,
    )
    return _aggregate_arrays(caps, per_sample, rate, spec.samples)


def _aggregate_arrays(caps: list[int], per_sample: dict, rate: float, samples: int) -> Any:
    """``_aggregate``'s frame from ``(samples, capacities)`` arrays of each ratio (one row:
    every sample alike, as at rate 1)."""
    import polars as pl

    cols: dict = {"capacity_blocks": pl.Series(caps, dtype=pl.Int64)}
    for r in _RATIOS:
        x = per_sample[r]
        cols[r] = x.mean(axis=0)
        cols[f"{r}_spread"] = x.std(axis=0, ddof=1) if len(x) > 1 else np.zeros(len(caps))
    cols["rate"] = np.full(len(caps), rate)
    cols["samples"] = pl.Series([samples] * len(caps), dtype=pl.Int64)
    return pl.DataFrame(cols)


_NO_HOT = np.zeros(0, dtype=np.int64)


def _id_chunks(table: Any) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """``(id chunks, request bounds per chunk, local starts, global offsets)``: the
    ``block_hashes`` column's chunks as numpy views, never concatenated (a table read
    from Parquet has one per row group; one flat copy of its ids would cost more than
    the sampled pass)."""
    from traces.columnar import hash_arrays, is_int_list

    col = table["block_hashes"]
    if is_int_list(col) and col.n_chunks() > 1:  # (str ids get dense codes: per table)
        parts = [hash_arrays(c) for c in col.get_chunks()]
        bounds = np.concatenate([[0], np.cumsum([len(o) - 1 for _, o in parts])])
        offsets = np.zeros(int(bounds[-1]) + 1, dtype=np.int64)
        np.cumsum(np.concatenate([np.diff(o) for _, o in parts]), out=offsets[1:])
        local = np.concatenate([o[:-1] for _, o in parts])
        return [v for v, _ in parts], bounds, local, offsets
    values, offsets = hash_arrays(table)
    return [values], np.asarray([0, len(offsets) - 1]), offsets[:-1], offsets


def sampled_replay(
    table: Any, capacity: int, policy: str = "lru", spec: SampleSpec | None = None, **kw: Any
) -> dict:
    """Replays of samples of ``table`` at the scaled capacity (any policy, ``simulate``).

    Returns:
        ``{"capacity_blocks", "rate", "samples", <ratio>, <ratio>_spread ...}``
        for the three hit ratios (mean over samples, sample standard deviation).
    """
    from .simulate import simulate

    spec = spec or SampleSpec()
    if spec.key == "stack":
        raise KVConfigError("key='stack' samples blocks, not requests: replays take root/session")
    cap = _check_caps([capacity])[0]
    rows = []
    for s in range(spec.samples):
        sample, rate = sample_table(table, spec, spec.seed + s)
        r = simulate(sample, _scaled(cap, rate), policy, mode="sequential", **kw).summary()
        rows.append({"row": 0, "capacity_blocks": cap, "rate": rate} | {k: r[k] for k in _RATIOS})
    return _aggregate(rows, [cap]).row(0, named=True)


def _ratios(df: Any, j: int) -> dict:
    return {r: float(df[r][j]) for r in _RATIOS}


def _check_caps(capacities: list) -> list[int]:
    caps = list(capacities)
    for c in caps:
        if isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 1:
            raise KVConfigError(f"a sampled capacity must be an int >= 1 block, got {c!r}")
    return [int(c) for c in caps]
