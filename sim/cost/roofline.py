"""Roofline step time from a model spec and a GPU spec.

Per step, over the batch sums (``BatchStats``)::

    linear layers : max(FLOPs / (peak x eff_gemm), (weights + activations) bytes / (HBM x eff_mem))
    attention     : max(FLOPs / (peak x eff_attn), KV bytes read and written / (HBM x eff_mem))
    step          : step_overhead_s + linear + attention

* linear FLOPs = 2 x tokens x (attention projections + MLP) params x layers, plus
  2 x sequences x hidden x vocab for the LM head (one sampled row per sequence);
  MoE: each token runs ``active_experts`` MLPs and the weights read are those of
  ``min(experts, tokens x active)`` experts;
* activations: each layer reads and writes its inputs/outputs once per GEMM,
  ``tokens x (4 hidden + 2 q + 4 kv + 3 intermediate)`` elements per layer;
* attention FLOPs = 4 x heads x head_dim x query-key pairs x layers (QK^T and PV);
  its bytes are the KV read (``kv_tokens``) plus the new tokens' KV written.

Efficiency factors (defaults, documented guesses to calibrate): ``eff_gemm=0.70``
(large bf16 GEMMs reach 60-80% of peak on Hopper), ``eff_attn=0.50`` (FlashAttention-2
forward reaches ~35-50% of peak; FA3 more), ``eff_mem=0.80`` (streaming reads reach
~80% of datasheet HBM bandwidth), ``step_overhead_s=0.0005`` (scheduler, sampling and
launch time per step with CUDA graphs). Tensor parallelism ``tp`` divides FLOPs and
bytes by ``tp`` (no communication cost: an underestimate for tp > 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sagellm_kv_cache.errors import KVConfigError

from .base import BatchStats, StepCostModel
from .gpus import GPUSpec, gpu_spec
from .models import ModelSpec, model_spec

__all__ = ["RooflineCost"]


@dataclass(frozen=True)
class RooflineCost(StepCostModel):
    model: ModelSpec
    gpu: GPUSpec
    eff_gemm: float = 0.70
    eff_attn: float = 0.50
    eff_mem: float = 0.80
    step_overhead_s: float = 0.0005
    tp: int = 1
    name: str = field(default="roofline", init=False)
    # constants of the per-step formula, set in __post_init__
    _peak: float = field(default=0.0, init=False, repr=False, compare=False)
    _bw: float = field(default=0.0, init=False, repr=False, compare=False)
    _act: float = field(default=0.0, init=False, repr=False, compare=False)
    _attn_flops: float = field(default=0.0, init=False, repr=False, compare=False)
    _kv_bytes: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", model_spec(self.model))
        object.__setattr__(self, "gpu", gpu_spec(self.gpu))
        for k in ("eff_gemm", "eff_attn", "eff_mem"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1:
                raise KVConfigError(f"{k} must be in (0, 1], got {v!r}")
        v = self.step_overhead_s
        if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
            raise KVConfigError(f"step_overhead_s must be >= 0, got {v!r}")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise KVConfigError(f"tp must be an integer >= 1, got {self.tp!r}")
        m, g = self.model, self.gpu
        peak = g.fp8_flops if m.dtype in ("fp8", "float8") and g.fp8_flops else g.bf16_flops
        b = m.bytes_per_param
        q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        # constants of the per-step formula, precomputed (the engine calls time() per step)
        object.__setattr__(self, "_peak", peak * self.tp)
        object.__setattr__(self, "_bw", g.hbm_bytes_per_s * self.eff_mem * self.tp)
        object.__setattr__(
            self, "_act", m.num_layers * b * (4 * m.hidden + 2 * q + 4 * kv + 3 * m.intermediate)
        )
        object.__setattr__(self, "_attn_flops", 4 * m.num_heads * m.head_dim * m.num_layers)
        object.__setattr__(self, "_kv_bytes", m.kv_bytes_per_token())

    # -- pieces (seconds) -------------------------------------------------------
    def linear_s(self, num_tokens: int, num_seqs: int) -> float:
        flops, nbytes = self._linear_work(num_tokens, num_seqs)
        return max(flops / (self._peak * self.eff_gemm), nbytes / self._bw)

    def _linear_work(self, num_tokens: int, num_seqs: int) -> tuple[float, float]:
        """(FLOPs, bytes) of the step's linear layers."""
        m = self.model
        L, b = m.num_layers, m.bytes_per_param
        if m.num_experts:
            per_tok = m.attn_params + m.active_experts * m.mlp_params
            experts_read = min(m.num_experts, num_tokens * m.active_experts)
            weights = L * (m.attn_params + experts_read * m.mlp_params)
        else:
            per_tok = m.attn_params + m.mlp_params
            weights = L * per_tok
        head = m.hidden * m.vocab
        flops = 2.0 * num_tokens * per_tok * L + 2.0 * num_seqs * head
        nbytes = (weights + head) * b + num_tokens * self._act
        return flops, nbytes

    def attention_s(self, attn_pairs: float, kv_tokens: int, num_tokens: int) -> float:
        flops = self._attn_flops * attn_pairs
        nbytes = (kv_tokens + num_tokens) * self._kv_bytes
        return max(flops / (self._peak * self.eff_attn), nbytes / self._bw)

    def unit_parts(self, st: BatchStats) -> tuple[float, float, float, float]:
        """Seconds at efficiency 1: (linear compute, linear memory, attention compute,
        attention memory); ``time`` is ``step_overhead_s + max(p0 / eff_gemm, p1 / eff_mem)
        + max(p2 / eff_attn, p3 / eff_mem)`` (what ``sim.calibrate`` fits)."""
        flops, nbytes = self._linear_work(st.num_tokens, st.num_seqs)
        bw = self._bw / self.eff_mem
        a_bytes = (st.kv_tokens + st.num_tokens) * self._kv_bytes
        return (
            flops / self._peak,
            nbytes / bw,
            self._attn_flops * st.attn_pairs / self._peak,
            a_bytes / bw,
        )

    def time(self, st: BatchStats) -> float:
        return (
            self.step_overhead_s
            + self.linear_s(st.num_tokens, st.num_seqs)
            + self.attention_s(st.attn_pairs, st.kv_tokens, st.num_tokens)
        )

    def prefill_s(self, tokens: int) -> float:
        """One prompt of ``tokens`` alone, in one step."""
        from .base import batch_stats

        return self.time(batch_stats([(tokens, 0)]))

    def describe(self) -> dict:
        return {
            "kind": self.name,
            "model": self.model.to_dict(),
            "gpu": self.gpu.name,
            "gpu_source": self.gpu.source,
            "eff_gemm": self.eff_gemm,
            "eff_attn": self.eff_attn,
            "eff_mem": self.eff_mem,
            "step_overhead_s": self.step_overhead_s,
            "tp": self.tp,
        }
