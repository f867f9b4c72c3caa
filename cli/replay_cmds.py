"""``sage-kv-stats replay``: replay a trace through the library's pool (sequential or concurrent).

Option defaults and help come from ``sim.config.ReplayConfig`` (``field_help``);
every run writes the resolved config as ``config.json`` next to its output.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from sagellm_kv_cache.errors import KVCacheError, KVConfigError
from sim.config import LinearCostModel, ReplayConfig, field_help, parse_capacity

from ._common import (
    check_not_empty,
    check_out_dir,
    clamp_capacity,
    distinct_blocks_of,
    inf_blocks,
    parse_tiers,
    require_model_shape,
    resolve_option,
    resolve_tiers,
)
from ._fleet import format_fleet, global_pool_cb, router_cb

_DEFAULTS = ReplayConfig.__dataclass_fields__


def _trace_formats() -> tuple[str, ...]:
    """Every format the trace readers know (the --format choices follow them)."""
    import traces.io

    return tuple(traces.io.FORMATS)


def _default(name: str):
    return _DEFAULTS[name].default


class PolicyName(click.ParamType):
    """An eviction policy registered at run time (``list_policies()``), aliases allowed."""

    name = "policy"

    def get_metavar(self, param, ctx=None) -> str:  # click 8.2+ passes ctx
        from sagellm_kv_cache.eviction import list_policies

        return "[" + "|".join(list_policies()) + "]"

    def convert(self, value, param, ctx):
        from sagellm_kv_cache.eviction import make_policy

        try:
            return make_policy(str(value)).name
        except KVConfigError as err:
            self.fail(err.message, param, ctx)


def _capacity_cb(ctx, param, value):
    try:
        parse_capacity(value)
        return str(value).strip()
    except KVConfigError as err:
        raise click.BadParameter(err.message) from None


def _cost_cb(ctx, param, value):
    if value and ":" in value:  # roofline:/table:/linear: specs (--engine iteration)
        from cli._iteration import check_cost_spec

        return check_cost_spec(value)
    try:
        return LinearCostModel.parse(value)
    except KVConfigError as err:
        raise click.BadParameter(err.message) from None


def _model_shape_cb(ctx, param, value):
    if value is None:
        return None
    from sagellm_kv_cache.model_shapes import resolve_model_shape

    try:
        resolve_model_shape(value)
    except KVConfigError as err:
        raise click.BadParameter(err.message) from None
    return value


def _curve_cb(ctx, param, value):
    items = [x.strip() for x in str(value).split(",") if x.strip()]
    if not items:
        raise click.BadParameter("give at least one capacity, e.g. 1000,10000")
    out = []
    for x in items:
        try:
            cap = parse_capacity(x)
        except KVConfigError as err:
            raise click.BadParameter(err.message) from None
        if cap.is_infinite:
            raise click.BadParameter(
                "the infinite-capacity line is always drawn; list finite sizes"
            )
        out.append(cap)
    return out


def _resolve_blocks(cap, block_size: int, model_shape, option: str, table=None) -> int | None:
    distinct = None if table is None else distinct_blocks_of(table)
    return resolve_option(
        cap, option, block_size=block_size, model_shape=model_shape, distinct_blocks=distinct
    ).blocks


_COST_EXAMPLE = "prefill_s_per_token=6e-5,decode_s_per_token=0.012"


def _cost_defaults() -> str:
    import dataclasses

    m = LinearCostModel()
    return ", ".join(f"{f.name}={getattr(m, f.name):g}" for f in dataclasses.fields(m))


@click.command()
@click.argument("trace", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--mode",
    type=click.Choice(["sequential", "concurrent"]),
    default=_default("mode"),
    show_default=True,
    help="sequential: each request is released before the next arrives (the setting of "
    "published hit ratios); concurrent: overlapping requests on a simulated clock.",
)
@click.option(
    "--format",
    "fmt",
    default=_default("format"),
    show_default=True,
    type=click.Choice(["auto", *_trace_formats()]),
    help="Trace format; auto detects it from the file's suffix and first record. "
    "azure and burstgpt carry lengths only: block ids come from a seeded synthetic prefix "
    "model (see traces.synthetic.PrefixModel); tokens are hashed at --block-size.",
)
@click.option(
    "--capacity",
    default=_default("capacity"),
    show_default=True,
    callback=_capacity_cb,
    help="Cache size: 10000 or 10000b (blocks), 5.12Mt or tokens:512k (tokens, rounded down "
    "to whole blocks), 40GiB or 512MB (bytes; needs --model-shape), 10% (of the trace's "
    "distinct blocks, rounded down), inf (never evicts). "
    "A size above 2**20 blocks that the trace cannot use is clamped to what it can (same "
    "result as inf).",
)
@click.option(
    "--model-shape",
    default=None,
    callback=_model_shape_cb,
    help="Model KV geometry that turns byte capacities into blocks: a preset (llama-3-8b: "
    "128 KiB per token in bf16; llama-3-70b, qwen2.5-7b, qwen2.5-72b, mistral-7b, "
    "deepseek-v3, gemma-2-9b, gemma-3-27b), LAYERS,KV_HEADS,HEAD_DIM,DTYPE (32,8,128,bf16) "
    "or a Hugging Face config.json (GQA, MLA and sliding-window layers read from it).",
)
@click.option(
    "--policy",
    type=PolicyName(),
    default=_default("policy"),
    show_default=True,
    help="Eviction policy (any registered in sagellm_kv_cache.eviction).",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens per block. Default: the trace's. Formats with fixed hash ids (mooncake: 512) "
    "accept only their own; formats that can re-hash are read at this size.",
)
@click.option(
    "--cost-model",
    "cost",
    default=None,
    metavar="NAME=VALUE,...",
    callback=_cost_cb,
    help="Concurrent mode: prefill_s = prefill_overhead_s + prefill_s_per_token x uncached "
    "tokens; decode_s = decode_overhead_s + decode_s_per_token x output tokens. Give "
    f"NAME=VALUE pairs, e.g. {_COST_EXAMPLE}; unnamed terms keep their defaults "
    f"({_cost_defaults()}).",
)
@click.option(
    "--max-num-seqs",
    type=click.IntRange(min=1),
    default=None,
    help=field_help("max_num_seqs").replace("concurrent mode: most", "Concurrent mode: most") + ".",
)
@click.option(
    "--curve",
    "curve_caps",
    default=_default("curve"),
    show_default=True,
    callback=_curve_cb,
    help="Capacities of the hit-ratio-vs-capacity figure (sequential replays), comma-separated; "
    "same units as --capacity.",
)
@click.option(
    "--tiers",
    default=None,
    callback=parse_tiers,
    help="Tiered replay instead: a capacity per tier in the --capacity units, e.g. "
    "gpu=10%,cpu=40GiB,disk=100000 (gpu first, then any of cpu, host, disk, nvme, ssd).",
)
@click.option(
    "--engine",
    type=click.Choice(["request", "iteration"]),
    default="request",
    show_default=True,
    help="iteration: vLLM-v1-like steps (token budget, chunked prefill, preemption); "
    "--cost-model may then be roofline:gpu=h100,model=llama-2-7b or table:FILE.json.",
)
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=None,
              help="--engine iteration: token budget per step (default 8192).")  # fmt: skip
@click.option("--chunked-prefill/--no-chunked-prefill", default=True, show_default=True,
              help="--engine iteration: split prompts across steps.")  # fmt: skip
@click.option(
    "--slo", default=None, help="--engine iteration: goodput SLOs, e.g. ttft=2s,tpot=50ms."
)
@click.option(
    "--instances",
    type=click.IntRange(1, 4096),
    default=None,
    help="Serving instances, each with its own cache of --capacity, behind --router "
    "(default round-robin); records gain an instance column, the summary per-instance "
    "metrics, load imbalance and the all-caches / best-instance bounds.",
)
@click.option(
    "--router",
    default=None,
    callback=router_cb,
    metavar="NAME[:K=V,...]",
    help="With --instances: round-robin, random:seed=, least-load, shortest-queue, best-fit, "
    "longest-prefix, kv-aware:weight=,temperature= (Dynamo's cost), cache-aware:"
    "cache_threshold=,balance_abs_threshold=,balance_rel_threshold= (SGLang's), "
    "consistent-hash:key=session|prefix.",
)
@click.option(
    "--global-pool",
    default=None,
    callback=global_pool_cb,
    metavar="CAPACITY",
    help="With --instances: a global KV pool of this size (--capacity units) shared by every "
    "instance; misses on an instance are fetched from it over an RDMA-class link "
    "(25 GB/s, 20 us) instead of recomputed. Needs --model-shape.",
)
@click.option(
    "--skip-bad", is_flag=True, help="Skip and count malformed records instead of stopping."
)
@click.option(
    "--out",
    "out_dir",
    default=_default("out_dir"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory.",
)
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show progress bars."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the summary (summary.json's content) to stdout as JSON instead of the table.",
)
@click.pass_context
def replay(
    ctx,
    trace,
    mode,
    fmt,
    capacity,
    model_shape,
    policy,
    block_size,
    cost,
    max_num_seqs,
    curve_caps,
    tiers,
    instances,
    router,
    global_pool,
    engine,
    max_num_batched_tokens,
    chunked_prefill,
    slo,
    skip_bad,
    out_dir,
    progress,
    as_json,
):
    """Replay a request trace through the real block pool and prefix cache.

    Sequential mode (default): each request looks up its leading cached
    blocks, allocates the rest (evicting by POLICY when full), caches its full
    blocks and is released before the next arrives.

    Concurrent mode: requests arrive at their trace times on a simulated clock,
    hold their blocks through prefill and decode (times from --cost-model),
    queue in FIFO order when the cache cannot give them their blocks, and are
    rejected when larger than the whole cache. Blocks become hittable when
    their prefill ends.

    Tiered replay (--tiers, needs --model-shape): the cache is a chain of
    tiers (GPU first); hits in lower tiers are loaded over their links, and a
    request larger than the GPU tier is rejected, as in every mode.

    Every mode writes the same files into --out: config.json (the resolved
    settings, with the detected trace format), records.parquet (one row per
    request: hits per tier, queue/prefill/decode/TTFT/TPOT/E2E times),
    summary.json and its figures (hit_ratio_vs_capacity.png; concurrent adds
    timeline.parquet and queue_ttft.png; tiered ttft.png), and prints the same
    compact table (--json: the summary as JSON instead).

    \b
    Examples:
      sage-kv-stats replay                               # bundled Mooncake trace
      sage-kv-stats replay trace.jsonl --capacity 30000 --out run1
      sage-kv-stats replay --capacity 5.12Mt --policy lru
      sage-kv-stats replay --capacity 40GiB --model-shape llama-3-8b
      sage-kv-stats replay --capacity inf --curve 500,2000,8000
      sage-kv-stats replay --mode concurrent --capacity 2000 --max-num-seqs 16
      sage-kv-stats replay --mode concurrent \\
          --cost-model prefill_s_per_token=5e-5,decode_s_per_token=0.01
      sage-kv-stats replay --tiers gpu=2000,cpu=8000 --model-shape llama-3-8b
      sage-kv-stats replay --mode concurrent --json      # the summary as JSON
      sage-kv-stats replay --mode concurrent --capacity 2000 \\
          --instances 8 --router kv-aware:weight=1,temperature=0
    """

    from sim.replay import hit_ratio_curve, replay_sequential
    from traces import DEFAULT_TRACE

    trace = trace or DEFAULT_TRACE
    if not Path(trace).exists():
        raise click.FileError(str(trace), hint="trace file not found")
    check_out_dir(out_dir)
    require_model_shape([parse_capacity(capacity)], "--capacity", model_shape)
    require_model_shape(curve_caps, "--curve", model_shape)
    require_model_shape((tiers or {}).values(), "--tiers", model_shape)
    src = ctx.get_parameter_source
    if engine == "iteration" or isinstance(cost, str):
        from cli._iteration import replay_iteration

        table = _read_or_fail(trace, fmt, block_size, skip_bad, stats := {})
        result, figures = replay_iteration(
            table, capacity, policy, cost, max_num_seqs, max_num_batched_tokens,
            chunked_prefill, slo, model_shape, progress, engine,
        )  # fmt: skip
        _finish_run(result, out_dir, trace, fmt, stats, figures, as_json)
        return
    explicit_cost = src("cost") == click.core.ParameterSource.COMMANDLINE
    if mode == "sequential":
        ignored = (("--max-num-seqs", "max_num_seqs"),)
        if not tiers:  # tiered sequential replay models each request's TTFT with the cost
            ignored = (("--cost-model", "cost"), *ignored)
        for opt, name in ignored:
            if src(name) == click.core.ParameterSource.COMMANDLINE:
                click.echo(f"note: {opt} only applies to --mode concurrent; ignored", err=True)
    fleet = instances is not None or router is not None or global_pool is not None
    if global_pool is not None and model_shape is None:
        raise click.BadParameter(
            "a global pool needs --model-shape (the bytes each fetched block costs)",
            param_hint="--global-pool",
        )
    if fleet and tiers:
        raise click.BadParameter("--instances/--router take no --tiers yet", param_hint="--tiers")
    if tiers:
        _replay_tiers(
            trace,
            fmt,
            tiers,
            policy,
            skip_bad,
            out_dir,
            mode,
            model_shape,
            explicit_cost,
            cost,
            max_num_seqs,
            as_json,
        )
        return
    stats: dict = {}
    try:
        table = _read(trace, fmt, block_size, skip_bad, stats)
    except KVCacheError as err:
        raise click.ClickException(err.message) from None
    check_not_empty(table, trace, stats)
    bs = int(table["block_size"][0])
    requested = _resolve_blocks(capacity, bs, model_shape, "--capacity", table)
    cap_blocks = clamp_capacity(requested, inf_blocks(table, mode))
    if cap_blocks != requested:
        click.echo(
            f"note: --capacity {capacity} ({requested} blocks) is more than this trace can use; "
            f"replaying at {cap_blocks} blocks, which never evicts (same result as inf)",
            err=True,
        )
    seq_limit = inf_blocks(table, "sequential")
    curve_blocks = sorted(
        {
            clamp_capacity(_resolve_blocks(c, bs, model_shape, "--curve", table), seq_limit)
            for c in curve_caps
        }
    )
    try:
        cfg = ReplayConfig(
            trace=str(trace),
            format=fmt,
            capacity=capacity if cap_blocks == requested else str(cap_blocks),
            policy=policy,
            block_size=bs,
            mode=mode,
            model_shape=model_shape,
            max_num_seqs=max_num_seqs,
            cost=cost,
            curve=",".join(str(c) for c in curve_blocks),
            skip_bad=skip_bad,
            progress=progress,
            out_dir=str(out_dir),
        )
        if fleet:
            from sim.simulate import simulate

            result = simulate(
                table,
                cap_blocks,
                policy,
                mode=mode,
                cost=cost if mode == "concurrent" else None,
                max_num_seqs=max_num_seqs if mode == "concurrent" else None,
                instances=instances or 1,
                router=router,
                model_shape=model_shape,
                fleet_options={"pooled": True, "global_pool": global_pool},
            )
        elif mode == "sequential":
            result = replay_sequential(table, cap_blocks, policy, progress=progress)
        else:
            from sim.engine import replay_concurrent

            result = replay_concurrent(table, cfg)
        curve = hit_ratio_curve(table, curve_blocks, (policy,), progress=progress)
    except KVCacheError as err:
        raise click.ClickException(err.message) from None
    result.config.update(
        {
            **cfg.to_dict(),
            "capacity_unit": result.config["capacity"]["unit"],
            "capacity_label": result.config["capacity"].get("label"),
            "capacity_blocks": result.capacity_blocks,
            "capacity_clamped_from_blocks": requested if cap_blocks != requested else None,
            "curve_capacities": curve_blocks,
        }
    )
    result.extra["curve"] = curve
    figures = {"hit_ratio_vs_capacity.png": lambda p: _plot_curve(curve, result, p, mode)}
    if fleet:
        figures["instances.png"] = lambda p: _plot_instances(result, p)
    elif mode == "concurrent":
        figures["queue_ttft.png"] = lambda p: _plot_queue(result, p)
    _finish_run(result, out_dir, trace, fmt, stats, figures, as_json)


def _plot_instances(result, path: Path) -> None:
    from sim.analysis.fleet_plots import plot_instances
    from sim.analysis.plots import save_figure

    save_figure(plot_instances(result.per_instance, title=f"router {result.router}"), path)


def _plot_queue(result, path: Path) -> None:
    from sim.analysis.plots import plot_queue_ttft, save_figure

    save_figure(plot_queue_ttft(result.records, result.timeline, result.capacity_blocks), path)


def _detected_format(trace, fmt: str) -> str:
    """The format the reader used: ``fmt``, or what ``auto`` detected."""
    if fmt != "auto":
        return fmt
    from traces.detect import detect_format

    try:
        return detect_format(trace)
    except KVCacheError:  # pragma: no cover - the reader already accepted the file
        return fmt


def _finish_run(result, out_dir: Path, trace, fmt, stats, figures: dict, as_json: bool) -> None:
    """What every replay mode does last: the same files, figures and compact table
    (or the summary as JSON on stdout with ``--json``)."""
    result.config.update(
        {"trace": str(trace), "format": _detected_format(trace, fmt), "format_requested": fmt}
    )
    result.extra["skipped_records"] = stats.get("skipped", 0)
    files = result.write(out_dir)
    for name, draw in figures.items():
        draw(out_dir / name)
        files.append(name)
    if as_json:
        from sim.result import _plain

        click.echo(json.dumps(_plain(result.summary()), indent=2))
        return
    from sim.report_table import format_summary

    click.echo(f"trace                {trace}")
    click.echo(format_summary(result.summary()))
    if "per_instance" in result.summary():
        click.echo(format_fleet(result.summary()))
    click.echo(f"wrote {out_dir}/{', '.join(files)}")


def _read_or_fail(trace, fmt, block_size, skip_bad, stats):
    try:
        table = _read(trace, fmt, block_size, skip_bad, stats)
    except KVCacheError as err:
        raise click.ClickException(err.message) from None
    check_not_empty(table, trace, stats)
    return table


def _read(trace, fmt, block_size, skip_bad, stats):
    """The canonical table; ``block_size`` goes to readers that accept it (re-hashing)."""
    from traces import read_trace

    if block_size is None:
        return read_trace(trace, fmt, skip_bad=skip_bad, stats=stats)
    try:
        table = read_trace(trace, fmt, skip_bad=skip_bad, stats=stats, block_size=block_size)
    except TypeError as err:  # a reader without re-hashing
        if "block_size" not in str(err):
            raise
        stats.clear()
        table = read_trace(trace, fmt, skip_bad=skip_bad, stats=stats)
    except KVCacheError as err:
        # blame --block-size only when the file reads fine at its own block size
        try:
            read_trace(trace, fmt, skip_bad=skip_bad)
        except KVCacheError:
            raise err from None
        raise click.BadParameter(
            f"{Path(trace).name} cannot be read at block size {block_size}: {err.message}",
            param_hint="--block-size",
        ) from None
    if len(table) and int(table["block_size"][0]) != block_size:
        raise click.BadParameter(
            f"{Path(trace).name} has fixed {int(table['block_size'][0])}-token blocks and "
            f"cannot be re-hashed at block size {block_size}",
            param_hint="--block-size",
        )
    return table


def _replay_tiers(
    trace,
    fmt,
    tiers,
    policy,
    skip_bad,
    out_dir,
    mode,
    model_shape,
    explicit_cost,
    cost,
    max_num_seqs=None,
    as_json=False,
) -> None:

    from types import SimpleNamespace

    from sim.tiered import replay_tiered
    from traces import read_trace

    stats: dict = {}
    try:
        table = read_trace(trace, fmt, skip_bad=skip_bad, stats=stats)
    except KVCacheError as err:
        raise click.ClickException(err.message) from None
    check_not_empty(table, trace, stats)
    if model_shape is None:  # the load time of every lower-tier hit depends on it
        raise click.BadParameter(
            "a tiered replay needs --model-shape (the bytes each block loaded from a lower "
            "tier costs), e.g. --model-shape llama-3-8b",
            param_hint="--model-shape",
        )
    limit = inf_blocks(table, "concurrent")  # all full blocks: no tier can evict
    requested = {name: str(spec) for name, spec in tiers.items()}  # as the user gave them
    tiers = resolve_tiers(tiers, table, model_shape=model_shape)
    spec = {name: clamp_capacity(n, limit) for name, n in tiers.items()}
    if spec != tiers:
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
        if model_shape:
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
    figures = {"ttft.png": lambda p: _plot_tiers(result, p)}
    _finish_run(result, out_dir, trace, fmt, stats, figures, as_json)


def _plot_tiers(result, path: Path) -> None:
    from sim.analysis.plots import plot_ttft, save_figure

    rec = result.records.filter(~result.records["rejected"])
    tps = result["config"]["prefill_tps"]
    per = {"ttft_s": rec["ttft_s"], "recompute_s": rec["input_length"] / tps}
    save_figure(plot_ttft(per, None, list(result.tiers)), path)


def _plot_curve(curve: list[dict], result, path: Path, mode: str = "sequential") -> None:
    from sim.analysis.plots import plot_capacity_curve, save_figure

    this_run = (result.capacity_blocks, result.token_hit_ratio)
    fig = plot_capacity_curve(curve, this_run=this_run, block_size=result.block_size, mode=mode)
    save_figure(fig, path)


COMMANDS = [replay]
