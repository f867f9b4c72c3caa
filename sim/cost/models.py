"""Model specs for the roofline: the shapes that set FLOPs and bytes per token."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sagellm_kv_cache.errors import KVConfigError

__all__ = ["MODELS", "ModelSpec", "model_spec"]

_DTYPE_BYTES = {
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8": 1,
    "float8": 1,
    "fp32": 4,
    "float32": 4,
}


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (gated MLP; MoE when ``num_experts`` > 0)."""

    name: str
    num_layers: int
    hidden: int
    intermediate: int  # dense MLP width (per expert for MoE)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    num_experts: int = 0
    active_experts: int = 0
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        for k in (
            "num_layers",
            "hidden",
            "intermediate",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab",
        ):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise KVConfigError(f"ModelSpec.{k} must be an integer >= 1, got {v!r}")
        if self.dtype not in _DTYPE_BYTES:
            raise KVConfigError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {self.dtype!r}")
        if self.num_experts and not 0 < self.active_experts <= self.num_experts:
            raise KVConfigError("active_experts must be in 1..num_experts for an MoE model")

    @property
    def bytes_per_param(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def attn_params(self) -> int:
        """Q, K, V and O projections of one layer."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden

    @property
    def mlp_params(self) -> int:
        """One expert's (or the dense) gated MLP: up, gate, down."""
        return 3 * self.hidden * self.intermediate

    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param

    def with_dtype(self, dtype: str) -> ModelSpec:
        d = asdict(self)
        d["dtype"] = dtype
        return ModelSpec(**d)

    def to_dict(self) -> dict:
        return asdict(self)


MODELS: dict[str, ModelSpec] = {
    # shapes from each model's Hugging Face config.json
    "llama-2-7b": ModelSpec("llama-2-7b", 32, 4096, 11008, 32, 32, 128, 32000),
    "llama-2-13b": ModelSpec("llama-2-13b", 40, 5120, 13824, 40, 40, 128, 32000),
    "llama-3-8b": ModelSpec("llama-3-8b", 32, 4096, 14336, 32, 8, 128, 128256),
    "qwen2.5-7b": ModelSpec("qwen2.5-7b", 28, 3584, 18944, 28, 4, 128, 152064),
    "mixtral-8x7b": ModelSpec("mixtral-8x7b", 32, 4096, 14336, 32, 8, 128, 32000, 8, 2),
}


def _from_hf(path: Path) -> ModelSpec:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise KVConfigError(f"cannot read model config {path}: {err}") from None
    if not isinstance(cfg, dict):
        raise KVConfigError(f"{path}: a config.json holds an object")
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg

    def get(*keys, default=None):
        for k in keys:
            if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool):
                return cfg[k]
        if default is None:
            raise KVConfigError(f"{path}: no integer {keys[0]!r}")
        return default

    hidden = get("hidden_size", "n_embd")
    heads = get("num_attention_heads", "n_head")
    experts = get("num_local_experts", "num_experts", "n_routed_experts", default=0)
    inter = get("moe_intermediate_size", default=0) if experts else 0
    inter = inter or get("intermediate_size", "ffn_dim", default=4 * hidden)
    dtype = str(cfg.get("torch_dtype", "bfloat16"))
    return ModelSpec(
        name=path.parent.name or path.name,
        num_layers=get("num_hidden_layers", "n_layer"),
        hidden=hidden,
        intermediate=inter,
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads", default=heads),
        head_dim=get("head_dim", default=hidden // heads),
        vocab=get("vocab_size"),
        num_experts=experts,
        active_experts=get("num_experts_per_tok", default=2) if experts else 0,
        dtype=dtype if dtype in _DTYPE_BYTES else "bf16",
    )


def model_spec(spec: str | ModelSpec, dtype: str | None = None) -> ModelSpec:
    """A preset name (``llama-2-7b``...) or a Hugging Face ``config.json`` path."""
    if isinstance(spec, ModelSpec):
        m = spec
    elif isinstance(spec, str) and spec.strip().lower() in MODELS:
        m = MODELS[spec.strip().lower()]
    elif isinstance(spec, str) and spec.endswith(".json"):
        m = _from_hf(Path(spec))
    else:
        raise KVConfigError(
            f"unknown model {spec!r}; presets {sorted(MODELS)} or a config.json path"
        )
    return m.with_dtype(dtype) if dtype else m
