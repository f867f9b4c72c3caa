"""Builds ``02-trace-replay.ipynb`` (run: ``python notebooks/build_02_trace_replay.py``).

The notebook is generated, not hand-edited: change the cells here.
"""

from pathlib import Path

from _build import write_notebook
from nbformat.v4 import new_code_cell, new_markdown_cell

CELLS = [
    new_markdown_cell(
        """# 02 - Trace replay: hit ratio vs cache size, and how far a policy is from optimal

What this notebook shows: how much of a real workload's prompt a prefix
cache could serve, as a function of its size and eviction policy. A request
trace (arrival time, prompt length, chained block hashes) is replayed
**sequentially** through the library's real block pool: each request looks up
its leading cached blocks, allocates the rest (evicting when full), caches
its full blocks and is released before the next request arrives.

Two bounds frame every curve:

* **infinite capacity**: nothing is ever evicted, so every block seen before is
  a hit. No policy at any size can do better.
* **OPT** (offline optimal, Belady): at a given size, evict the block whose
  next use is furthest in the future. It needs the future, so no online
  policy can do better *at that size*.

Everything is computed by `sim` and drawn by `sim.analysis.plots`; this notebook
defines no logic. The same sweep from a shell:
`sage-kv-stats sweep traces/data/mooncake_synthetic_trace.jsonl --policies lru,arc`."""
    ),
    new_code_cell(
        """# parameters: papermill -p TRACE path/to/trace.jsonl (None: the bundled Mooncake sample)
TRACE = None""",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        """import polars as pl

from sim.analysis.plots import plot_sweep
from sagellm_kv_cache.eviction.registry import list_policies
from sim.replay import replay_sequential
from sim.sweep import sweep
from traces import DEFAULT_TRACE, read_trace

%matplotlib inline"""
    ),
    new_markdown_cell(
        """## The bundled trace

A synthetic trace published with Mooncake (Apache-2.0): about 4,000 requests
over 17 minutes. `read_trace` validates it line by line and returns the
canonical polars table: one row per request, `block_hashes` lists one id per
512-token block, and an id stands for its block *and everything before it*
(ids are prefix-chained), so two requests share a block id only if they
share the whole prefix up to it."""
    ),
    new_code_cell(
        """trace = read_trace(TRACE or DEFAULT_TRACE)
trace.head()"""
    ),
    new_code_cell(
        """trace.select(
    pl.len().alias("requests"),
    (pl.col("arrival_s").max() / 60).alias("minutes"),
    pl.col("input_length").mean().round(0).alias("mean_prompt_tokens"),
    pl.col("input_length").median().alias("median_prompt_tokens"),
    pl.col("block_hashes").list.len().sum().alias("block_references"),
    pl.col("block_hashes").explode().n_unique().alias("distinct_blocks"),
)"""
    ),
    new_markdown_cell(
        """About 122k block references but only about 44k distinct blocks: roughly
two thirds of all block references repeat a prefix seen before. That
fraction is (close to) the infinite-capacity hit ratio. The distinct-block
count is also the size at which a cache would never need to evict."""
    ),
    new_markdown_cell(
        """## One sequential replay and its per-request records

LRU at 10,000 blocks (about 5.1M tokens of KV). The result carries the
totals and one record per request: how many full blocks it had, how many of
them hit, and how many blocks its allocation evicted."""
    ),
    new_code_cell(
        """result = replay_sequential(trace, 10_000, "lru")
{k: v for k, v in result.summary().items()}"""
    ),
    new_code_cell(
        """records = pl.DataFrame(result.records)
records.head()"""
    ),
    new_markdown_cell(
        """Per-minute token hit ratio from those records. It is far from steady:
a few percent in the first minutes (a cold cache, and requests that share
little), then a steady climb to nearly every token hitting in the last
minutes, when requests mostly revisit earlier prefixes. One trace-wide
ratio averages over that drift; check a trace's time profile before
treating its overall number as typical."""
    ),
    new_code_cell(
        """per_minute = (
    records.with_columns((pl.col("arrival_s") // 60).cast(pl.Int64).alias("minute"))
    .group_by("minute")
    .agg(
        pl.len().alias("requests"),
        (pl.col("hit_tokens").sum() / pl.col("input_length").sum()).alias("token_hit_ratio"),
        pl.col("evicted_blocks").sum().alias("evicted_blocks"),
    )
    .sort("minute")
)
ax = per_minute.to_pandas().plot(
    x="minute", y="token_hit_ratio", marker="o", ylim=(0, 1), legend=False,
    title="LRU @ 10,000 blocks: token hit ratio per minute",
)
ax.set_ylabel("token hit ratio");
per_minute.head()"""
    ),
    new_markdown_cell(
        """## A small sweep: capacities x policies, with both bounds

Four sizes from 1,000 to 30,000 blocks, LRU and ARC (when registered). Each
(policy, capacity) is one independent replay, so the sweep runs them in
parallel worker processes; the rows come back in a fixed order whatever
finishes first, and they equal what the serial executor or a direct
`replay_sequential` call gives, block for block."""
    ),
    new_code_cell(
        """capacities = [1_000, 3_000, 10_000, 30_000]
policies = [p for p in ("lru", "arc") if p in list_policies()]
print("policies:", policies)
results = sweep(
    [("mooncake", trace)], capacities, policies, executor="process", workers=2, progress=False
)
results.select("policy", "kind", "capacity_blocks", "token_hit_ratio", "evictions", "seconds")"""
    ),
    new_markdown_cell(
        """The sweep's points are exact replays at four sizes. For LRU alone, one pass
over the trace gives the hit ratio at *every* size (`sim.mrc.lru_mrc`, from
reuse distances; equal to the replays at these sizes), drawn as the thin
line: it shows where between the swept sizes the LRU curve bends."""
    ),
    new_code_cell(
        """import numpy as np

from sim.mrc import lru_mrc

every_size = lru_mrc(trace).hit_ratios(np.unique(np.geomspace(500, 45_000, 60).astype(int)).tolist())
fig = plot_sweep(results, title="Mooncake synthetic trace, sequential replay")
ax = fig.axes[0]
ax.plot(
    every_size["capacity_blocks"], every_size["token_hit_ratio"],
    color="C0", lw=1, alpha=0.6, label="lru, every size (one pass)",
)
ax.legend(loc="lower right", fontsize=9);"""
    ),
    new_markdown_cell(
        """## What to look for

**How far LRU is from OPT.** The table below divides each policy's token
hit ratio by OPT's at the same size (1.0 = optimal). The gap is largest
for small caches: there the order of evictions decides almost everything, and
knowing the future is worth a lot; an online policy that wants to close
part of that gap needs to predict reuse (frequency, prefix popularity).
As the cache grows the curves converge, because less has to be evicted at all."""
    ),
    new_code_cell(
        """wide = results.pivot(on="policy", index="capacity_blocks", values="token_hit_ratio")
if "opt" in wide.columns:
    wide = wide.with_columns(
        (pl.col(p) / pl.col("opt")).round(3).alias(f"{p}/opt") for p in policies
    )
wide"""
    ),
    new_markdown_cell(
        """**Where the curve flattens.** Once a policy's curve meets the dashed
infinite-capacity line, extra memory buys nothing for this trace: every
repeated prefix already hits. Below it, each step shows what more KV memory
would be worth. The smallest swept size at which each policy reaches 95% of
the infinite-capacity ratio:"""
    ),
    new_code_cell(
        """ceiling = results.filter(pl.col("policy") == "infinite")["token_hit_ratio"][0]
(
    results.filter(pl.col("policy") != "infinite")
    .with_columns((pl.col("token_hit_ratio") / ceiling).alias("share_of_ceiling"))
    .filter(pl.col("share_of_ceiling") >= 0.95)
    .group_by("policy", maintain_order=True)
    .agg(pl.col("capacity_blocks").min().alias("first_capacity_at_95pct"))
)"""
    ),
    new_markdown_cell(
        """The swept sizes are coarse; the one-pass LRU curve locates the bend more
precisely: the smallest size (of its 60) at which LRU reaches 95% and 99% of
the ceiling."""
    ),
    new_code_cell(
        """pl.DataFrame(
    {
        "share_of_ceiling": [0.95, 0.99],
        "lru_capacity_blocks": [
            every_size.filter(pl.col("token_hit_ratio") >= share * ceiling)["capacity_blocks"].min()
            for share in (0.95, 0.99)
        ],
    }
)"""
    ),
    new_markdown_cell(
        """On this trace OPT needs about a third of the memory LRU does to reach
the same hit ratio at small sizes (OPT at 3,000 blocks beats LRU at 10,000),
and reaches 95% of the ceiling at 10,000 blocks where LRU and ARC need
30,000 (the one-pass curve puts LRU's 95% point near 24,000 blocks and its
99% point near 33,000). At 30,000 blocks every policy is within a few
percent of the ceiling, although the trace has about 44,000 distinct blocks: more than half
of them are used only once, so they never needed to stay. A policy study on another
trace starts from the same two questions: how high is the ceiling, and how
much of the gap to OPT is left at the memory you can afford."""
    ),
]


NAME = "02-trace-replay.ipynb"


def main() -> Path:
    return write_notebook(CELLS, NAME)


if __name__ == "__main__":
    print(main())
