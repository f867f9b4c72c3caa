"""Fit a step cost model to measured request timings and state its error.

Input: per-request timings as ``vllm bench serve --save-result`` writes them
(``ttfts``: seconds, ``itls``: per request the list of inter-token gaps,
``input_lens``, ``output_lens``), or the same keys in any JSON object.

The fit assumes the requests ran alone (``vllm bench serve --max-concurrency 1``):
then each TTFT is one prefill step of ``input_len`` tokens and each ITL one
decode step at its context length, and ``LinearStepCost``'s factors are two
non-negative least-squares fits::

    ttft            = prefill_overhead_s + (prefill_s_per_token + kv_s_per_token) x n
                      + attn_s_per_pair x n (n + 1) / 2
    itl at context c = decode_step_s + (attn_s_per_pair + kv_s_per_token) x (c + 1)

(``step_overhead_s`` is folded into the two overheads.) A share of the requests
(``holdout``, drawn with ``seed``) is kept out of the fit; the error reported is
the mean absolute percentage error (MAPE) of TTFT and of each request's mean ITL
on those held-out requests.

``model="roofline:gpu=...,model=..."`` fits the roofline model's factors instead
(``eff_gemm``, ``eff_attn``, ``eff_mem``, ``step_overhead_s``; ``sim.cost.roofline``)
on the same steps: each step's time is ``step_overhead_s + max(g / eff_gemm,
m / eff_mem) + max(a / eff_attn, k / eff_mem)`` with ``(g, m, a, k)`` the step's
seconds at efficiency 1 (``RooflineCost.unit_parts``), a piecewise-linear function
of the inverse efficiencies, fitted by bounded least squares on relative errors
(efficiencies in (0, 1], the overhead >= 0; TTFTs weighted to count as much as all
the ITL gaps together; started from the given factors and from two other guesses,
the best kept).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError

from .cost.base import StepCostModel, batch_stats
from .cost.linear import LinearStepCost
from .cost.roofline import RooflineCost

__all__ = ["Calibration", "calibrate", "load_timings"]


@dataclass
class Calibration:
    model: StepCostModel
    ttft_mape: float
    itl_mape: float
    num_fit: int
    num_holdout: int
    spec: str | None = None  # what --cost-model takes (None: a model given as an object)

    def to_dict(self) -> dict:
        spec = self.spec
        if spec is None and isinstance(self.model, LinearStepCost):
            d = self.model.describe()
            spec = "linear:" + ",".join(f"{k}={v!r}" for k, v in d.items() if k != "kind")
        return {
            "model": self.model.describe(),
            "spec": spec,
            "ttft_mape": self.ttft_mape,
            "itl_mape": self.itl_mape,
            "num_fit": self.num_fit,
            "num_holdout": self.num_holdout,
        }


def load_timings(path_or_obj: Any) -> dict:
    """The four per-request lists from a bench result file or object (typed errors)."""
    if isinstance(path_or_obj, str | Path):
        try:
            d = json.loads(Path(path_or_obj).read_text())
        except (OSError, ValueError) as err:
            raise KVInvalidInputError(f"cannot read timings {path_or_obj}: {err}") from None
    else:
        d = path_or_obj
    if not isinstance(d, dict):
        raise KVInvalidInputError("timings must be a JSON object")
    keys = ("ttfts", "itls", "input_lens", "output_lens")
    missing = [k for k in keys if not isinstance(d.get(k), list)]
    if missing:
        raise KVInvalidInputError(
            f"timings lack list(s) {missing} (vllm bench serve --save-result)"
        )
    n = len(d["ttfts"])
    if any(len(d[k]) != n for k in keys) or n < 5:
        raise KVInvalidInputError(
            "ttfts, itls, input_lens, output_lens must be equal lists of >= 5"
        )
    try:
        ttft = np.asarray(d["ttfts"], dtype=np.float64)
        inp = np.asarray(d["input_lens"], dtype=np.int64)
        itls = [np.asarray(x, dtype=np.float64) for x in d["itls"]]
    except (TypeError, ValueError) as err:
        raise KVInvalidInputError(f"timings hold non-numbers: {err}") from None
    if (ttft <= 0).any() or (inp < 1).any() or any((x < 0).any() for x in itls):
        raise KVInvalidInputError("timings need ttft > 0, input_len >= 1, itl >= 0")
    return {"ttft": ttft, "input": inp, "itls": itls}


def _nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    x, _ = nnls(A / scale, y)
    return x / scale


def calibrate(timings: Any, holdout: float = 0.2, seed: int = 0, model: Any = None) -> Calibration:
    """Fit ``LinearStepCost`` (``model`` None or ``"linear"``) or a roofline model's
    factors (``model`` a ``roofline:`` text or a ``RooflineCost``) to ``timings`` (see
    the module doc); MAPE on held-out requests.

    Raises:
        KVConfigError: a bad ``holdout`` or ``model``. KVInvalidInputError: bad timings.
    """
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 < holdout < 1:
        raise KVConfigError(f"holdout must be a share in (0, 1), got {holdout!r}")
    base = _base_model(model)
    t = load_timings(timings)
    n = len(t["ttft"])
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, round(n * holdout))
    test, fit = order[:k], order[k:]
    if not sum(len(t["itls"][i]) for i in fit):
        raise KVInvalidInputError("no inter-token latencies to fit (every output was 1 token)")
    spec = None
    if base is None:
        fitted: StepCostModel = _fit_linear(t, fit)
    else:
        fitted = _fit_roofline(base, t, fit)
        if isinstance(model, str):
            spec = _roofline_spec(model, fitted)
    ttft_mape, itl_mape = _holdout_errors(fitted, t, test)
    return Calibration(fitted, ttft_mape, itl_mape, len(fit), len(test), spec)


def _base_model(model: Any) -> RooflineCost | None:
    """None for the linear fit, else the roofline model whose factors are fitted."""
    if model is None or (isinstance(model, str) and model.strip().lower() in ("linear", "")):
        return None
    if isinstance(model, str):
        from .cost.parse import parse_cost_model

        model = parse_cost_model(model)
    if not isinstance(model, RooflineCost):
        raise KVConfigError(
            f"calibrate fits the linear model or a roofline: model, got {type(model).__name__}"
        )
    return model


def _fit_linear(t: dict, fit: np.ndarray) -> LinearStepCost:
    n = len(t["ttft"])
    x = t["input"].astype(np.float64)
    A = np.stack([np.ones(n), x, x * (x + 1) / 2], axis=1)
    po, ppt_kv, aspp = _nnls(A[fit], t["ttft"][fit])
    ctx, gaps = [], []
    for i in fit:
        g = t["itls"][i]
        ctx.append(x[i] + np.arange(1, len(g) + 1))  # the j-th gap decodes at context x + j
        gaps.append(g)
    c = np.concatenate(ctx)
    B = np.stack([np.ones(len(c)), c + 1], axis=1)
    ds, slope = _nnls(B, np.concatenate(gaps))
    kv = max(0.0, slope - aspp)
    return LinearStepCost(
        step_overhead_s=0.0,
        prefill_overhead_s=float(po),
        prefill_s_per_token=float(max(0.0, ppt_kv - kv)),
        decode_step_s=float(ds),
        decode_s_per_seq=0.0,
        attn_s_per_pair=float(aspp),
        kv_s_per_token=float(kv),
    )


def _fit_roofline(base: RooflineCost, t: dict, fit: np.ndarray) -> RooflineCost:
    """The roofline factors by bounded least squares on relative errors (module doc)."""
    import dataclasses

    from scipy.optimize import least_squares

    rows, ys, ws = [], [], []
    num_gaps = sum(len(t["itls"][i]) for i in fit)
    w_ttft = np.sqrt(max(1.0, num_gaps / len(fit)))  # TTFTs count as much as all gaps
    for i in fit:
        x = int(t["input"][i])
        rows.append(base.unit_parts(batch_stats([(x, 0)])))
        ys.append(t["ttft"][i])
        ws.append(w_ttft)
        for j, g in enumerate(t["itls"][i], start=1):
            if g > 0:
                rows.append(base.unit_parts(batch_stats([(1, x + j)])))
                ys.append(g)
                ws.append(1.0)
    P = np.asarray(rows)
    w = np.asarray(ws) / np.asarray(ys)

    def pred(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lin_c, lin_m = P[:, 0] * p[1], P[:, 1] * p[3]
        att_c, att_m = P[:, 2] * p[2], P[:, 3] * p[3]
        return (
            p[0] + np.maximum(lin_c, lin_m) + np.maximum(att_c, att_m),
            lin_c >= lin_m,
            att_c >= att_m,
        )

    def resid(p: np.ndarray) -> np.ndarray:
        return (pred(p)[0] - ys_a) * w

    def jac(p: np.ndarray) -> np.ndarray:
        _, lc, ac = pred(p)
        J = np.empty((len(P), 4))
        J[:, 0] = 1.0
        J[:, 1] = np.where(lc, P[:, 0], 0.0)
        J[:, 2] = np.where(ac, P[:, 2], 0.0)
        J[:, 3] = np.where(lc, 0.0, P[:, 1]) + np.where(ac, 0.0, P[:, 3])
        return J * w[:, None]

    ys_a = np.asarray(ys)
    lo, hi = [0.0, 1.0, 1.0, 1.0], [np.inf, 1e3, 1e3, 1e3]
    starts = [
        [base.step_overhead_s, 1 / base.eff_gemm, 1 / base.eff_attn, 1 / base.eff_mem],
        [0.0, 1.0, 1.0, 1.0],
        [1e-3, 4.0, 4.0, 2.0],
    ]
    best = None
    for x0 in starts:
        r = least_squares(resid, np.asarray(x0, dtype=np.float64), jac=jac, bounds=(lo, hi))
        if best is None or r.cost < best.cost:
            best = r
    assert best is not None
    o, ia, it, im = (float(v) for v in best.x)
    return dataclasses.replace(
        base, step_overhead_s=o, eff_gemm=1 / ia, eff_attn=1 / it, eff_mem=1 / im
    )


def _roofline_spec(text: str, m: RooflineCost) -> str:
    """``text`` with the fitted factors in place of any it gave."""
    from .cost.parse import _FLOATS, _items

    kind, _, rest = text.partition(":")
    items = {k: v for k, v in _items(rest).items() if k not in _FLOATS}
    items.update({k: repr(float(getattr(m, k))) for k in _FLOATS})
    return kind.strip().lower() + ":" + ",".join(f"{k}={v}" for k, v in items.items())


def _holdout_errors(model: StepCostModel, t: dict, test: np.ndarray) -> tuple[float, float]:
    """(TTFT MAPE, mean-ITL MAPE) of ``model`` on the held-out requests."""
    x = t["input"]
    pred_ttft = np.array([model.step_time([(int(x[i]), 0)]) for i in test])
    ttft_mape = float(np.mean(np.abs(pred_ttft - t["ttft"][test]) / t["ttft"][test]))
    errs = []
    for i in test:
        g = t["itls"][i]
        if len(g) and g.mean() > 0:
            p = np.mean([model.step_time([(1, int(x[i]) + j)]) for j in range(1, len(g) + 1)])
            errs.append(abs(p - g.mean()) / g.mean())
    itl_mape = float(np.mean(errs)) if errs else float("nan")
    return ttft_mape, itl_mape
