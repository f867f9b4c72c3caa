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
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def calibrate(timings: Path, holdout: float, seed: int, as_json: bool) -> None:
    """Fit the linear step cost model to TIMINGS and print its held-out error.

    TIMINGS is a `vllm bench serve --save-result` JSON (ttfts, itls, input_lens,
    output_lens), best measured with --max-concurrency 1 (each request alone).
    The printed spec is what --cost-model takes.

    \b
    Example:
      sage-kv-stats calibrate bench.json
    """
    from sagellm_kv_cache.errors import KVCacheError
    from sim.calibrate import calibrate as fit

    if not 0 < holdout < 1:
        raise click.BadParameter("must be in (0, 1)", param_hint="--holdout")
    try:
        cal = fit(str(timings), holdout=holdout, seed=seed)
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
