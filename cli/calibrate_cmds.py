"""``sage-kv-stats calibrate``: fit a step cost model to measured request timings."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("timings", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--holdout",
    type=float,
    default=0.2,
    show_default=True,
    help="share of requests kept out of the fit",
)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the held-out draw")
@click.option(
    "--model",
    "model",
    default="linear",
    show_default=True,
    help="model whose factors to fit: linear, or roofline:gpu=NAME,model=NAME[,dtype=..,tp=..]",
)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def calibrate(timings: Path, holdout: float, seed: int, model: str, as_json: bool) -> None:
    """Fit a step cost model's factors to TIMINGS and print its held-out error.

    TIMINGS is a `vllm bench serve --save-result` JSON (ttfts, itls, input_lens,
    output_lens), best measured with --max-concurrency 1 (each request alone).
    The linear model's coefficients, or the roofline model's efficiency factors
    (eff_gemm, eff_attn, eff_mem, step_overhead_s) with --model roofline:...
    The printed spec is what --cost-model takes.

    \b
    Example:
      sage-kv-stats calibrate bench.json
      sage-kv-stats calibrate bench.json --model roofline:gpu=h100,model=llama-2-7b
    """
    from sagellm_kv_cache.errors import KVCacheError
    from sim.calibrate import calibrate as fit

    if not 0 < holdout < 1:
        raise click.BadParameter("must be in (0, 1)", param_hint="--holdout")
    try:
        cal = fit(str(timings), holdout=holdout, seed=seed, model=model)
    except KVCacheError as err:
        raise click.ClickException(f"[{err.code}] {err.message}") from None
    d = cal.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"fitted on {d['num_fit']} requests, tested on {d['num_holdout']}")
    click.echo(f"TTFT MAPE {d['ttft_mape']:.2%}   ITL MAPE {d['itl_mape']:.2%}")
    click.echo(f"--cost-model {d['spec']}")


COMMANDS: list[click.Command] = [calibrate]
