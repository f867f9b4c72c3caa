"""``sage-kv-stats replay``: replay a trace through the library's pool (sequential or concurrent).

Option defaults and help come from ``sim.config.ReplayConfig`` (``field_help``);
every run writes the resolved config as ``config.json`` next to its output.
"""

from __future__ import annotations

from pathlib import Path

import click

from sagellm_kv_cache.errors import KVCacheError, KVConfigError
from sim.config import LinearCostModel, ReplayConfig, field_help, parse_capacity

from ._common import (
    CapacityListType,
    block_size_option,
    check_out_dir,
    choice_option,
    clamp_capacity,
    distinct_blocks_of,
    format_option,
    inf_blocks,
    int_option,
    json_option,
    mode_option,
    model_shape_option,
    out_option,
    parse_tiers,
    progress_option,
    read_table,
    require_model_shape,
    resolve_option,
    skip_bad_option,
)
from ._fleet import global_pool_cb, router_cb
from ._iteration import link_cb, pd_cb
from ._replay_output import finish_run, plot_curve, plot_instances, plot_queue
from ._tiers import replay_tiers

_DEFAULTS = ReplayConfig.__dataclass_fields__


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
@mode_option(
    _default("mode"),
    "sequential: each request is released before the next arrives (the setting of "
    "published hit ratios); concurrent: overlapping requests on a simulated clock.",
)
@format_option(
    "Trace format; auto detects it from the file's suffix and first record. "
    "azure and burstgpt carry lengths only: block ids come from a seeded synthetic prefix "
    "model (see traces.synthetic.PrefixModel); tokens are hashed at --block-size.",
    default=_default("format"),
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
@model_shape_option(
    "Model KV geometry that turns byte capacities into blocks: a preset (llama-3-8b: "
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
@block_size_option(
    "Tokens per block. Default: the trace's. Formats with fixed hash ids (mooncake: 512) "
    "accept only their own; formats that can re-hash are read at this size."
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
@int_option(
    "--max-num-seqs",
    help=field_help("max_num_seqs").replace("concurrent mode: most", "Concurrent mode: most") + ".",
)
@click.option(
    "--curve",
    "curve_caps",
    default=_default("curve"),
    show_default=True,
    type=CapacityListType(allow_inf=False),
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
@choice_option(
    "--engine",
    choices=["request", "iteration"],
    default="request",
    help="iteration: vLLM-v1-like steps (token budget, chunked prefill, preemption); "
    "--cost-model may then be roofline:gpu=h100,model=llama-2-7b or table:FILE.json.",
)
@int_option(
    "--max-num-batched-tokens", help="--engine iteration: token budget per step (default 8192)."
)
@click.option("--chunked-prefill/--no-chunked-prefill", default=True, show_default=True,
              help="--engine iteration: split prompts across steps.")  # fmt: skip
@click.option(
    "--slo", default=None, help="--engine iteration: goodput SLOs, e.g. ttft=2s,tpot=50ms."
)
@click.option(
    "--pd",
    default=None,
    metavar="P:D",
    callback=pd_cb,
    help="Prefill/decode disaggregation (iteration engine): P prefill and D decode instances, "
    "each with --capacity blocks; the prompt KV moves over --link (TTFT includes it).",
)
@click.option(
    "--link",
    default="nvlink",
    show_default=True,
    callback=link_cb,
    help="With --pd: nvlink, ib-ndr, tcp-100g, none, bw=25GB/s,lat=10us, or "
    "bench:FILE.json (bench_transfer.py's measured GB/s). KV bytes from --model-shape.",
)
@int_option(
    "--instances",
    max=4096,
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
    "--sample",
    "sample_spec",
    default=None,
    metavar="SPEC",
    help="Also estimate the sequential-LRU hit ratios at --capacity and the --curve "
    "capacities from samples of the trace (sim.sampling): a rate or size=N, then optionally "
    "the key (stack, root, session) and the number of samples, e.g. 1% or 1%:stack:4. Each "
    "ratio is printed with its +- spread (standard deviation over the samples).",
)
@skip_bad_option()
@out_option(_default("out_dir"))
@progress_option()
@json_option("Print the summary (summary.json's content) to stdout as JSON instead of the table.")
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
    pd,
    link,
    sample_spec,
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
    spec = _sample_spec(sample_spec)
    if not Path(trace).exists():
        raise click.FileError(str(trace), hint="trace file not found")
    check_out_dir(out_dir)
    require_model_shape([parse_capacity(capacity)], "--capacity", model_shape)
    require_model_shape(curve_caps, "--curve", model_shape)
    require_model_shape((tiers or {}).values(), "--tiers", model_shape)
    src = ctx.get_parameter_source
    if engine == "iteration" or isinstance(cost, str) or pd is not None:
        from cli._iteration import replay_iteration

        table = read_table(trace, fmt, block_size, skip_bad, stats := {})
        result, figures = replay_iteration(
            table, capacity, policy, cost, max_num_seqs, max_num_batched_tokens,
            chunked_prefill, slo, model_shape, progress, engine, pd, link,
        )  # fmt: skip
        finish_run(result, out_dir, trace, fmt, stats, figures, as_json)
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
        replay_tiers(
            trace, fmt, tiers, policy, skip_bad, out_dir, mode, model_shape,
            explicit_cost, cost, max_num_seqs, as_json,
        )  # fmt: skip
        return
    stats: dict = {}
    table = read_table(trace, fmt, block_size, skip_bad, stats)
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
    figures = {"hit_ratio_vs_capacity.png": lambda p: plot_curve(curve, result, p, mode)}
    if fleet:
        figures["instances.png"] = lambda p: plot_instances(result, p)
    elif mode == "concurrent":
        figures["queue_ttft.png"] = lambda p: plot_queue(result, p)
    finish_run(result, out_dir, trace, fmt, stats, figures, as_json)
    if spec is not None:
        _print_sampled(table, [cap_blocks, *curve_blocks], spec, as_json)


def _sample_spec(text):
    """``--sample``'s text as a ``SampleSpec`` (None when not given)."""
    if text is None:
        return None
    from sim.sampling import SampleSpec

    try:
        return SampleSpec.parse(text)
    except KVCacheError as err:
        raise click.BadParameter(err.message, param_hint="--sample") from None


def _print_sampled(table, caps: list, spec, as_json: bool) -> None:
    """The sampled sequential-LRU ratios, each with its spread (stderr under --json)."""
    from sim.sampling import sampled_curve

    try:
        df = sampled_curve(table, sorted(set(caps)), spec)
    except KVCacheError as err:
        raise click.ClickException(err.message) from None
    rate, n = float(df["rate"][0]), int(df["samples"][0])
    click.echo(f"sampled sequential LRU ({rate:.2%}, {n} samples; mean +- spread):", err=as_json)
    for row in df.iter_rows(named=True):
        ratios = "  ".join(
            f"{r.split('_')[0]} {row[r]:.4f} +- {row[r + '_spread']:.4f}"
            for r in ("token_hit_ratio", "block_hit_ratio", "request_hit_ratio")
        )
        click.echo(f"  {row['capacity_blocks']:>10} blocks: {ratios}", err=as_json)


COMMANDS = [replay]
