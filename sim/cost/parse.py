"""``parse_cost_model``: text or objects -> a ``StepCostModel``."""

from __future__ import annotations

from typing import Any

from sagellm_kv_cache.errors import KVConfigError

from .base import StepCostModel
from .linear import LinearStepCost

__all__ = ["parse_cost_model"]

_FLOATS = ("eff_gemm", "eff_attn", "eff_mem", "step_overhead_s")


def _items(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise KVConfigError(f"bad cost model item {part!r}; use name=value")
        out[key.strip()] = value.strip()
    return out


def parse_cost_model(spec: Any) -> StepCostModel:
    """A ``StepCostModel`` from an instance, a ``LinearCostModel``, or text:

    * ``roofline:gpu=h100,model=llama-2-7b[,dtype=fp8,tp=2,eff_gemm=0.7,...]``
    * ``table:PATH.json`` or ``table:NAME`` (a bundled measured table, ``TableCost.bundled()``)
    * ``linear:prefill_s_per_token=6e-5,decode_step_s=0.012,...`` (``LinearStepCost`` fields)
    * a bare ``name=value`` list or None: the request-level ``LinearCostModel`` text,
      mapped per step (``LinearStepCost.from_linear``).
    """
    from ..config import LinearCostModel

    if isinstance(spec, StepCostModel):
        return spec
    if spec is None or isinstance(spec, LinearCostModel | dict):
        lin = spec if isinstance(spec, LinearCostModel) else LinearCostModel(**(spec or {}))
        return LinearStepCost.from_linear(lin)
    if not isinstance(spec, str):
        raise KVConfigError(f"cost model must be text or a model, got {spec!r}")
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep:
        return LinearStepCost.from_linear(LinearCostModel.parse(spec))
    if kind == "table":
        from .table import TableCost

        return TableCost.load(rest.strip())
    if kind == "linear":
        kw = _items(rest)
        try:
            return LinearStepCost(**{k: float(v) for k, v in kw.items()})
        except (TypeError, ValueError) as err:
            raise KVConfigError(f"bad linear cost model {rest!r}: {err}") from None
    if kind == "roofline":
        from .gpus import gpu_spec
        from .models import model_spec
        from .roofline import RooflineCost

        kw = _items(rest)
        unknown = set(kw) - {"gpu", "model", "dtype", "tp", *_FLOATS}
        if unknown or "gpu" not in kw or "model" not in kw:
            raise KVConfigError(
                f"roofline needs gpu= and model= (optional dtype, tp, {', '.join(_FLOATS)}); got {rest!r}"
            )
        try:
            extra: dict[str, Any] = {k: float(kw[k]) for k in _FLOATS if k in kw}
            if "tp" in kw:
                extra["tp"] = int(kw["tp"])
        except ValueError as err:
            raise KVConfigError(f"bad roofline number: {err}") from None
        return RooflineCost(model_spec(kw["model"], kw.get("dtype")), gpu_spec(kw["gpu"]), **extra)
    raise KVConfigError(f"unknown cost model kind {kind!r}; use linear:, roofline: or table:")
