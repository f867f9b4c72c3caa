"""The existing linear coefficients as a per-step model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import check_fields_nonnegative
from .base import BatchStats, StepCostModel

__all__ = ["LinearStepCost"]


@dataclass(frozen=True)
class LinearStepCost(StepCostModel):
    """A step's time, linear in its sums::

        step_s = step_overhead_s
               + prefill_overhead_s   (when the step has prefill tokens)
               + prefill_s_per_token  x prefill tokens (tokens of non-decode sequences)
               + decode_step_s        (when the step has decodes: weights read once)
               + decode_s_per_seq     x decodes
               + attn_s_per_pair      x query-key pairs
               + kv_s_per_token       x KV tokens read

    ``from_linear(LinearCostModel)`` maps the request-level coefficients:
    ``prefill_overhead_s`` and ``prefill_s_per_token`` as they are,
    ``decode_s_per_token`` becomes ``decode_step_s`` (decodes batch for free, as
    a memory-bound step does). A request alone then takes ``prefill_s(uncached)
    + decode_s_per_token x (output - 1)`` (its first token comes with its prefill;
    ``decode_overhead_s`` has no per-step meaning and is dropped).
    """

    name = "linear"
    step_overhead_s: float = 0.0
    prefill_overhead_s: float = 0.010
    prefill_s_per_token: float = 6.0e-5
    decode_step_s: float = 0.012
    decode_s_per_seq: float = 0.0
    attn_s_per_pair: float = 0.0
    kv_s_per_token: float = 0.0

    def __post_init__(self) -> None:
        check_fields_nonnegative(self)

    @classmethod
    def from_linear(cls, m) -> LinearStepCost:
        return cls(
            prefill_overhead_s=m.prefill_overhead_s,
            prefill_s_per_token=m.prefill_s_per_token,
            decode_step_s=m.decode_s_per_token,
        )

    @classmethod
    def zero(cls) -> LinearStepCost:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def time(self, st: BatchStats) -> float:
        pre = st.num_tokens - st.num_decodes
        t = self.step_overhead_s + self.attn_s_per_pair * st.attn_pairs
        t += self.kv_s_per_token * st.kv_tokens + self.decode_s_per_seq * st.num_decodes
        if pre:
            t += self.prefill_overhead_s + self.prefill_s_per_token * pre
        if st.num_decodes:
            t += self.decode_step_s
        return t

    def describe(self) -> dict:
        return {"kind": self.name, **dataclasses.asdict(self)}
