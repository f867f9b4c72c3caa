"""The step cost interface and the batch sums every model reads."""

from __future__ import annotations

from typing import NamedTuple

from sagellm_kv_cache.errors import KVInvalidInputError

__all__ = ["BatchStats", "StepCostModel", "batch_stats"]


class BatchStats(NamedTuple):
    """Sums over one step's sequences.

    num_tokens: new tokens computed (the GEMMs' M dimension).
    num_seqs: sequences in the batch (each samples one token: the LM head's rows).
    num_decodes: sequences with exactly one new token after a non-empty context.
    attn_pairs: query-key pairs attended, causal: ``sum new*ctx + new*(new+1)/2``.
    kv_tokens: KV tokens read by attention, ``sum ctx + new``.
    """

    num_tokens: int
    num_seqs: int
    num_decodes: int
    attn_pairs: float
    kv_tokens: int


def batch_stats(batch) -> BatchStats:
    """``[(new_tokens, context_len), ...]`` -> ``BatchStats`` (typed error for bad rows)."""
    t = s = d = r = 0
    a = 0.0
    for row in batch:
        try:
            new, ctx = row
        except (TypeError, ValueError):
            raise KVInvalidInputError(
                f"batch rows are (new_tokens, context_len), got {row!r}"
            ) from None
        if (
            isinstance(new, bool)
            or isinstance(ctx, bool)
            or not isinstance(new, int)
            or not isinstance(ctx, int)
        ):
            raise KVInvalidInputError(f"batch rows are (int, int), got {row!r}")
        if new < 1 or ctx < 0:
            raise KVInvalidInputError(f"batch row needs new_tokens >= 1, context_len >= 0: {row!r}")
        t += new
        s += 1
        if new == 1 and ctx > 0:
            d += 1
        a += new * ctx + new * (new + 1) / 2
        r += ctx + new
    return BatchStats(t, s, d, a, r)


class StepCostModel:
    """Base class: subclasses implement ``time(stats)``; ``step_time(batch)`` wraps it.

    ``describe()`` is the JSON-able record written into a run's config.
    """

    name = "base"

    def time(self, st: BatchStats) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def step_time(self, batch) -> float:
        """Seconds one step takes for ``batch`` (``[(new_tokens, context_len), ...]``)."""
        st = batch_stats(batch)
        return self.time(st) if st.num_seqs else 0.0

    def describe(self) -> dict:
        return {"kind": self.name}
