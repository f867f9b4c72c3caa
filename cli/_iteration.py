"""``replay --engine iteration`` (and ``--pd``): option checks and the run (kept out of replay_cmds)."""

from __future__ import annotations

from pathlib import Path

import click


def check_cost_spec(value: str) -> str:
    from sagellm_kv_cache.errors import KVConfigError
    from sim.cost import parse_cost_model

    try:
        parse_cost_model(value)
    except KVConfigError as err:
        raise click.BadParameter(err.message, param_hint="--cost-model") from None
    return value


def pd_cb(ctx, param, value):
    """``--pd P:D`` -> (P, D) or None."""
    from sagellm_kv_cache.errors import KVConfigError
    from sim.pd.run import parse_pd

    if value is None:
        return None
    try:
        return parse_pd(value)
    except KVConfigError as err:
        raise click.BadParameter(err.message, param_hint="--pd") from None


def link_cb(ctx, param, value):
    """``--link`` spec, checked (``sim.pd.parse_link``)."""
    from sagellm_kv_cache.errors import KVConfigError
    from sim.pd.link import parse_link

    try:
        parse_link(value)
    except KVConfigError as err:
        raise click.BadParameter(err.message, param_hint="--link") from None
    return value


def replay_iteration(
    table, capacity, policy, cost, max_num_seqs, mbt, chunked, slo, shape, progress, engine,
    pd=None, link="nvlink",
):  # fmt: skip
    """The result and its figures; typed errors become one ``Error:`` line. With ``pd``
    (prefill, decode) counts: prefill/decode disaggregation (``sim.pd``) over ``link``."""
    from sagellm_kv_cache.errors import KVCacheError
    from sim.iteration_run import parse_slo, simulate_iteration

    if pd is None and engine != "iteration":
        raise click.BadParameter(
            "roofline:/table:/linear: cost models need --engine iteration",
            param_hint="--cost-model",
        )
    try:
        parse_slo(slo)
    except KVCacheError as err:
        raise click.BadParameter(err.message, param_hint="--slo") from None
    cap = None if str(capacity).strip().lower() == "inf" else capacity
    kw = dict(cost=cost, max_num_seqs=max_num_seqs, max_num_batched_tokens=mbt)
    kw.update(chunked_prefill=chunked, slo=slo, model_shape=shape)
    try:
        if pd is None:
            res = simulate_iteration(table, cap, policy, progress=progress, **kw)
        else:
            from sim.pd import simulate_pd

            res = simulate_pd(table, pd, cap, policy, link=link, **kw)
    except KVCacheError as err:
        raise click.ClickException(f"[{err.code}] {err.message}") from None
    return res, {"latency_cdf.png": lambda p: plot_cdfs(res, p)}


def plot_cdfs(res, path: Path) -> None:
    """CDFs of TTFT, TPOT and E2E (the figures ``vllm bench serve`` summarises)."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, col in zip(axes, ("ttft_s", "tpot_s", "e2e_s")):
        v = res.records[col].drop_nulls().to_numpy()
        v = np.sort(v[~np.isnan(v)])
        if len(v):
            ax.plot(v, np.arange(1, len(v) + 1) / len(v))
        ax.set_xlabel(col.replace("_s", " (s)"))
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
