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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError

from .cost.linear import LinearStepCost

__all__ = ["Calibration", "calibrate", "load_timings"]


@dataclass
class Calibration:
    model: LinearStepCost
    ttft_mape: float
    itl_mape: float
    num_fit: int
    num_holdout: int

    def to_dict(self) -> dict:
        return {
            "model": self.model.describe(),
            "spec": "linear:"
            + ",".join(f"{k}={v!r}" for k, v in self.model.describe().items() if k != "kind"),
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


def calibrate(timings: Any, holdout: float = 0.2, seed: int = 0) -> Calibration:
    """Fit ``LinearStepCost`` to ``timings`` (see the module doc); MAPE on held-out requests."""
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0 < holdout < 1:
        raise KVConfigError(f"holdout must be a share in (0, 1), got {holdout!r}")
    t = load_timings(timings)
    n = len(t["ttft"])
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, round(n * holdout))
    test, fit = order[:k], order[k:]
    x = t["input"].astype(np.float64)
    A = np.stack([np.ones(n), x, x * (x + 1) / 2], axis=1)
    po, ppt_kv, aspp = _nnls(A[fit], t["ttft"][fit])
    ctx, gaps = [], []
    for i in fit:
        g = t["itls"][i]
        ctx.append(x[i] + np.arange(1, len(g) + 1))  # the j-th gap decodes at context x + j
        gaps.append(g)
    if not sum(len(g) for g in gaps):
        raise KVInvalidInputError("no inter-token latencies to fit (every output was 1 token)")
    c = np.concatenate(ctx)
    B = np.stack([np.ones(len(c)), c + 1], axis=1)
    ds, slope = _nnls(B, np.concatenate(gaps))
    kv = max(0.0, slope - aspp)
    model = LinearStepCost(
        step_overhead_s=0.0,
        prefill_overhead_s=float(po),
        prefill_s_per_token=float(max(0.0, ppt_kv - kv)),
        decode_step_s=float(ds),
        decode_s_per_seq=0.0,
        attn_s_per_pair=float(aspp),
        kv_s_per_token=float(kv),
    )
    pred_ttft = np.array([model.step_time([(int(x[i]), 0)]) for i in test])
    ttft_mape = float(np.mean(np.abs(pred_ttft - t["ttft"][test]) / t["ttft"][test]))
    errs = []
    for i in test:
        g = t["itls"][i]
        if len(g) and g.mean() > 0:
            p = np.mean([model.step_time([(1, int(x[i]) + j)]) for j in range(1, len(g) + 1)])
            errs.append(abs(p - g.mean()) / g.mean())
    itl_mape = float(np.mean(errs)) if errs else float("nan")
    return Calibration(model, ttft_mape, itl_mape, len(fit), len(test))
