"""Trace tables built from prefix-chained block-id lists (shared by the sim tests)."""

from __future__ import annotations

import random

import polars as pl


def table_from_chains(chains: list[list[int]], tails: list[int] | None = None, block_size=16):
    """Canonical trace table: request i names ``chains[i]`` as full blocks, plus a partial
    block of ``tails[i]`` tokens (a fresh id) when ``tails[i] > 0``."""
    tails = tails or [0] * len(chains)
    fresh = 1 + max((h for c in chains for h in c), default=0)
    ids, lengths = [], []
    for c, tail in zip(chains, tails):
        ids.append(list(c) + ([fresh + len(ids)] if tail else []))
        lengths.append(len(c) * block_size + tail)
    n = len(chains)
    return pl.DataFrame(
        {
            "request_id": pl.Series([f"r-{i}" for i in range(n)], dtype=pl.Utf8),
            "arrival_s": pl.Series([float(i) for i in range(n)], dtype=pl.Float64),
            "input_length": pl.Series(lengths, dtype=pl.Int64),
            "output_length": pl.Series([1] * n, dtype=pl.Int64),
            "block_hashes": pl.Series(ids, dtype=pl.List(pl.Int64)),
            "block_size": pl.Series([block_size] * n, dtype=pl.Int64),
        }
    )


def random_chained_chains(rng: random.Random, num_requests: int, max_new: int) -> list[list[int]]:
    """Prefix-chained ids: each request shares a prefix of an earlier one, then fresh ids."""
    chains: list[list[int]] = []
    next_id = 1
    for _ in range(num_requests):
        base = rng.choice(chains) if chains and rng.random() < 0.8 else []
        shared = base[: rng.randint(0, len(base))]
        new = list(range(next_id, next_id + rng.randint(0 if shared else 1, max_new)))
        next_id += len(new)
        chains.append(shared + new)
    return chains
