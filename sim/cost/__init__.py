"""Step cost models: the time one engine step (one batch) takes on the simulated GPU.

One interface (``StepCostModel.step_time(batch) -> seconds``) where ``batch``
lists ``(new_tokens, context_len)`` per scheduled sequence (``context_len``: the
tokens already in its KV cache before this step). Every model reduces a batch
to five sums (``BatchStats``) so the iteration engine can time long runs of
pure decode steps without a Python loop per sequence:

==================  ==========================================================
``LinearStepCost``  the existing ``LinearCostModel`` coefficients, per step
``RooflineCost``    model spec x GPU spec: max(compute, memory traffic) per part
``TableCost``       measured step times on a (tokens, KV tokens) grid, interpolated
==================  ==========================================================

``parse_cost_model("roofline:gpu=h100,model=llama-2-7b")``, ``"linear:..."``,
``"table:path.json"`` or a bare ``name=value`` list (linear) builds one.
"""

from __future__ import annotations

from .base import BatchStats, StepCostModel, batch_stats
from .gpus import GPUS, GPUSpec, gpu_spec
from .linear import LinearStepCost
from .models import MODELS, ModelSpec, model_spec
from .parse import parse_cost_model
from .roofline import RooflineCost
from .table import TableCost

__all__ = [
    "GPUS",
    "MODELS",
    "BatchStats",
    "GPUSpec",
    "LinearStepCost",
    "ModelSpec",
    "RooflineCost",
    "StepCostModel",
    "TableCost",
    "batch_stats",
    "gpu_spec",
    "model_spec",
    "parse_cost_model",
]
