"""``replay --tiers``: a tiered replay (GPU, then CPU / disk tiers over their links)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from sagellm_kv_cache.errors import KVCacheError

from ._common import clamp_capacity, inf_blocks, read_table, resolve_tiers
from ._replay_output import finish_run, plot_tiers


def replay_tiers(trace: Any, fmt: str, tiers: dict, policy: str, skip_bad: bool, out_dir: Path,
                 mode: str, model_shape: Any, explicit_cost: bool, cost: Any,
                 max_num_seqs: int | None = None, as_json: bool = False) -> None:  # fmt: skip
    """Replay ``trace`` through ``tiers`` (name -> capacity spec) and write the run.

    The trace is read at its own block size (``--block-size`` does not apply here).
    """
    from sim.tiered import replay_tiered

    stats: dict = {}
    table = read_table(trace, fmt, None, skip_bad, stats)
    if model_shape is None:  # the load time of every lower-tier hit depends on it
        raise click.BadParameter(
            "a tiered replay needs --model-shape (the bytes each block loaded from a lower "
            "tier costs), e.g. --model-shape llama-3-8b",
            param_hint="--model-shape",
        )
    limit = inf_blocks(table, "concurrent")  # all full blocks: no tier can evict
    requested = {name: str(spec) for name, spec in tiers.items()}  # as the user gave them
    blocks = resolve_tiers(tiers, table, model_shape=model_shape)
    spec = {name: clamp_capacity(n, limit) for name, n in blocks.items()}
    if spec != blocks:
        click.echo(
            f"note: --tiers capacities above {limit} blocks (all of this trace's full blocks) "
            "never evict; clamped to it (same result)",
            err=True,
        )
    try:
        config = SimpleNamespace(
            block_size=int(table["block_size"][0]),
            sequential=mode == "sequential",
            policy=policy,
        )
        from sagellm_kv_cache.model_shapes import resolve_model_shape

        config.model = resolve_model_shape(model_shape)  # a ModelShape: presets, custom, HF
        if explicit_cost:  # otherwise the tiered model keeps its own defaults
            config.prefill_tokens_per_s = (
                1.0 / cost.prefill_s_per_token if cost.prefill_s_per_token else float("inf")
            )
            config.decode_s_per_token = cost.decode_s_per_token
        out_dir.mkdir(parents=True, exist_ok=True)
        config.max_num_seqs = max_num_seqs
        result = replay_tiered(table, tiers=spec, config=config, out_dir=None)
    except KVCacheError as err:
        raise click.ClickException(err.message) from None
    result.config["model_shape"] = str(model_shape)
    result.config["tiers_requested"] = requested
    finish_run(result, out_dir, trace, fmt, stats, {"ttft.png": lambda p: plot_tiers(result, p)},
               as_json)  # fmt: skip
