"""Prefix-aware spatial sampling: curves and replays of a trace's sample, with their spread.

Curves default to key ``"stack"`` (``sim.sampling_kernel``): in the
sequential-LRU model a block hits iff its stack depth is below the capacity,
and tail-first release keeps every parent above its child, so the prefix rule
needs no whole chains: blocks are sampled by a salted hash of their id,
hot blocks (hash buckets with many accesses) are kept in every sample, and
each depth is estimated as the Horvitz-Thompson weight of the kept distinct
blocks above it, at full scale (no scaled capacity). Measured (1%, 4 samples,
3M-block synthetic trace): token-hit MAE 0.0017 against exact, where the
request keys below give 0.22. Replays keep whole requests:

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
    so no capacity is scaled and no request is too large. Keys ``"root"`` and
    ``"session"``: ``sim.mrc`` on each sampled table at the scaled capacity.

    Args:
        table: a canonical trace table.
        capacities: capacities of the whole trace, in blocks (ints).
        spec: the sampling (default: 1% by block stack, 4 samples).

    Returns:
        a polars DataFrame, one row per capacity in the order given:
        ``capacity_blocks`` and, for each of ``token_hit_ratio``,
        ``block_hit_ratio``, ``request_hit_ratio``, the mean over samples and
        its ``*_spread``; ``rate`` (mean sampling rate) and ``samples``.

    Raises:
        KVConfigError: a bad spec or capacity.
    """
    spec = spec or SampleSpec()
    caps = _check_caps(capacities)
    if spec.key in (None, "stack"):
        return _aggregate(_stack_rows(table, caps, spec), caps)
    from .mrc import lru_mrc

    rows = []
    for s in range(spec.samples):
        sample, rate = sample_table(table, spec, spec.seed + s)
        m = lru_mrc(sample)
        df = m.hit_ratios([_scaled(c, rate) for c in caps])
        for j, c in enumerate(caps):
            rows.append({"row": j, "capacity_blocks": c, "rate": rate} | _ratios(df, j))
    return _aggregate(rows, caps)


HOT_ACCESSES = 64  # a hash bucket with this many accesses is kept whole in every sample


def _stack_rows(table: Any, caps: list[int], spec: SampleSpec) -> list[dict]:
    """One row per (sample, capacity) of the ``"stack"`` estimate."""
    from traces.columnar import hash_arrays

    from .sampling_kernel import bucket_counts, sample_pass

    values, offsets = hash_arrays(table)
    lengths = table["input_length"].to_numpy().astype(np.int64, copy=False)
    n = len(lengths)
    block_size = int(table["block_size"][0]) if n and "block_size" in table.columns else 512
    fulls = lengths // block_size
    starts = np.ascontiguousarray(offsets[:-1], dtype=np.int64)
    total = int(fulls.sum())
    bits = int(np.clip(np.ceil(np.log2(max(total, 1) / 4)), 10, 22))
    counts = bucket_counts(values, starts, fulls, bits)
    hot = counts >= HOT_ACCESSES
    if spec.size is None:
        rate = float(spec.rate)  # type: ignore[arg-type]
    else:  # fixed size: that many blocks of the distinct ones (linear-counting estimate)
        empty = max(int(np.count_nonzero(counts == 0)), 1)
        distinct = max(len(counts) * np.log(len(counts) / empty), 1.0)
        rate = min(1.0, spec.size / distinct)
    order = np.argsort(caps, kind="stable")
    sorted_caps = np.asarray(caps, dtype=np.int64)[order]
    prompt = int(lengths.sum())
    rows = []
    for s in range(spec.samples):
        hit, req_hit, _ = sample_pass(
            values, starts, fulls, bits, hot, rate, spec.seed + s, sorted_caps
        )
        back = np.empty(len(caps))
        back_req = np.empty(len(caps))
        back[order] = hit
        back_req[order] = req_hit
        for j, c in enumerate(caps):
            rows.append(
                {
                    "row": j,
                    "capacity_blocks": c,
                    "rate": rate,
                    "token_hit_ratio": back[j] * block_size / prompt if prompt else 0.0,
                    "block_hit_ratio": back[j] / total if total else 0.0,
                    "request_hit_ratio": back_req[j] / n if n else 0.0,
                }
            )
    return rows


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
