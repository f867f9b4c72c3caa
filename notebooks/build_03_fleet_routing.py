"""Builds ``03-fleet-routing.ipynb`` (run: ``python notebooks/build_03_fleet_routing.py``).

The notebook is generated, not hand-edited: change the cells here.
"""

from pathlib import Path

from _build import write_notebook
from nbformat.v4 import new_code_cell, new_markdown_cell

CELLS = [
    new_markdown_cell(
        """# 03 - Fleet routing: which router, and is a global KV pool worth it?

The planning question after "what hit rate would this cache give me": *I run N
replicas, which router should sit in front of them, and would a shared (global)
KV pool pay off?* This notebook replays a request trace through N serving
instances on one simulated clock. Each instance is the library's real block
pool (metadata-only, its own eviction policy and queue); a request is routed
when it arrives by the library's `LoadAwareScheduler`
(`sagellm_kv_cache.placement`), the same object an engine would use.

Two parts:

1. **Routers** on the bundled Mooncake trace with 4 instances: token hit ratio,
   TTFT p50/p99 and load imbalance per router, then the routers against the
   instance count.
2. **Local caches against a global pool**, in the manner of the Mooncake
   paper's Fig. 10 (10 prefill nodes, 3M-token caches each), on the bundled
   traces.

Everything is computed by `sim` and drawn by `sim.analysis`; this notebook
defines no logic. The same runs from a shell (the trace defaults to the bundled one):
`sage-kv-stats replay --mode concurrent --capacity 2000 --instances 4 --router cache-aware`
(add `--global-pool CAPACITY --model-shape llama-3-8b` for a shared pool) and
`sage-kv-stats sweep --mode concurrent --capacities 2000 --instances 1,2,4,8 --routers round-robin,cache-aware`."""
    ),
    new_code_cell(
        """# parameters: papermill -p TRACE path/to/trace.jsonl (None: the bundled Mooncake sample)
TRACE = None
INSTANCES = 4  # part 1: instances behind each router
CAPACITY_BLOCKS = 2_000  # part 1: blocks per instance (512-token blocks: ~1M tokens)
NODES = 10  # part 2: prefill nodes, as in the paper's Fig. 10
PAPER_NODE_TOKENS = 3_000_000  # part 2: the paper's cache per node""",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        """import matplotlib.pyplot as plt
import polars as pl

from sim.analysis.fleet_plots import (
    COMPARED_ROUTERS,
    plot_instances,
    plot_routers,
    router_summary,
)
from sim.routers import ROUTERS
from sim.simulate import simulate
from sim.sweep import sweep
from traces import DEFAULT_TRACE, bundled_path, read_trace

pl.Config.set_tbl_cols(12).set_tbl_width_chars(200).set_fmt_str_lengths(40)
%matplotlib inline"""
    ),
    new_markdown_cell(
        """## Part 1: routers on one trace

The routers, by the names `simulate(router=...)` and `--router` take (parameters
after a colon, `kv-aware:weight=1,temperature=0`):

* `round-robin`, `random`: blind to load and to the cache.
* `least-load` (lowest KV use), `shortest-queue` (fewest running + waiting),
  `best-fit`: the seed's load-aware strategies.
* `longest-prefix`: the instance holding the longest cached prefix of the request.
* `kv-aware`: NVIDIA Dynamo's KV router, cost = weight x blocks to prefill +
  blocks in use, lowest cost (or softmax sampling with a temperature).
* `cache-aware`: SGLang's router: the longest prefix match when it covers more than
  `cache_threshold` (0.3) of the request, the least loaded instance otherwise, and
  the shortest queue whenever the load is imbalanced (`balance_abs_threshold` 64,
  `balance_rel_threshold` 1.5).
* `consistent-hash`: a hash ring on the session or on the prefix root (llm-d /
  sticky-session style).

Mode `concurrent`: requests arrive at their trace times, queue, prefill and
decode on the default linear cost model, so queueing and TTFT are measured on
the simulated clock. Every instance has `CAPACITY_BLOCKS` blocks under LRU."""
    ),
    new_code_cell(
        """trace = read_trace(TRACE or DEFAULT_TRACE)
print(sorted(ROUTERS))
trace.select(
    pl.len().alias("requests"),
    (pl.col("arrival_s").max() / 60).round(1).alias("minutes"),
    pl.col("block_hashes").list.len().sum().alias("block_references"),
    pl.col("block_hashes").explode().n_unique().alias("distinct_blocks"),
)"""
    ),
    new_code_cell(
        """print(COMPARED_ROUTERS)
runs = {
    r: simulate(trace, CAPACITY_BLOCKS, "lru", mode="concurrent", instances=INSTANCES, router=r)
    for r in COMPARED_ROUTERS
}
router_summary(runs).with_columns(pl.col(pl.Float64).round(3))"""
    ),
    new_markdown_cell(
        """How to read the columns:

* `token_hit_ratio`: prompt tokens served from the instance's cache / all prompt tokens.
* `ttft_p50_s`, `ttft_p99_s`: time to first token (queueing + prefill of the
  uncached part), simulated seconds.
* `load_imbalance`: max / mean of the prompt tokens each instance received
  (1.0 = perfectly even).
* `best_instance_hit_ratio`: had each request gone to the instance holding most of
  it *at routing time*; `regret_hit_ratio` = best - routed, the reuse the router
  left behind.
* `all_caches_hit_ratio`: had each request been able to use every instance's cache
  (their union, N x C blocks, as this router filled them): a bound on the run's
  own hit ratio, not across routers (a router that keeps a prefix on one instance
  also stores fewer copies of it, so its union holds more).

On the bundled Mooncake trace the blind routers (round-robin, random) and the
load-only ones (least-load, shortest-queue) all sit near 0.11-0.12: they spread
each prefix over the 4 caches, so every instance holds a quarter of the reuse
and evicts the rest. The prefix-aware routers (longest-prefix, cache-aware,
consistent hashing on the prefix root) keep a prefix on one instance and triple
the hit ratio to about 0.37-0.38, which cuts the TTFT median from about 0.35 s
to 0.04 s. Dynamo's cost at weight 1 sits between them: it also counts the
blocks in use, so it sometimes gives up a match for a less busy instance. The
price of affinity is imbalance: consistent hashing has the highest max/mean
load. The regret column says how much reuse was on another instance when a
request was routed: about 0.22 of all prompt tokens for the blind routers,
0.06 for Dynamo's cost, next to none for the prefix-matching ones. TTFT p99 moves
much less than the median: the tail is the long prompts with no shared
prefix, which every router has to compute."""
    ),
    new_code_cell(
        """fig, axes = plt.subplots(1, 2, figsize=(13, 3.5))
for ax, r in zip(axes, ["round-robin", "cache-aware"]):
    plot_instances(runs[r].stats["per_instance"], ax=ax, title=f"{r}: load and hits per instance")
fig.tight_layout()"""
    ),
    new_markdown_cell(
        """## Routers against the instance count

The same replay at 1, 2, 4 and 8 instances (each with `CAPACITY_BLOCKS` blocks,
so the fleet's total cache grows with it), for four routers. At one instance
every router is the same replay. With round-robin, more instances bring more
cache but no more hits: each prefix is split N ways. A prefix-aware router
turns the extra memory into hits, at some cost in balance."""
    ),
    new_code_cell(
        """by_count = sweep(
    [("trace", trace)],
    [CAPACITY_BLOCKS],
    ["lru"],
    executor="serial",
    mode="concurrent",
    bounds=False,
    progress=False,
    grid={
        "instances": [1, 2, 4, 8],
        "router": ["round-robin", "longest-prefix", "kv-aware", "cache-aware"],
    },
)
plot_routers(by_count);
by_count.select("setting", "token_hit_ratio", "ttft_p99_s", "load_imbalance")"""
    ),
    new_markdown_cell(
        """## Part 2: local caches against a global pool (after the Mooncake paper's Fig. 10)

The Mooncake paper (FAST'25) compares, with 10 prefill nodes and a 3M-token
cache on each, the hit ratio when every node only reuses its *own* cache
(local) with the hit ratio when every node can reuse blocks cached anywhere
(a global pool over the nodes' memory). It reports the global pool giving
**2.22x / 1.38x / 2.36x** the local hit ratio on its three traces.

Here, for each bundled trace with block ids:

* **local**: `simulate(instances=10, router=...)`, each node a pool of C blocks;
* **global**: the same fleet plus a shared pool of 10 x C blocks every prefill
  writes to and every node reads from over a link
  (`fleet_options={"global_pool": ...}`, `sim.global_pool`); a request hits its
  node's cache first, then the shared pool;
* **one pool of 10 x C** (`pooled`): the whole fleet's memory as one cache, the
  equal-memory reading of "global" (the sim's global mode adds the shared pool
  *on top of* the local caches).

**Scaling the cache to the small traces.** 10 x 3M tokens would hold most
bundled traces many times over. So the per-node cache is set as a *share of
each trace's distinct blocks*: the share that 3M tokens is of the bundled
Mooncake trace (the paper's own synthetic trace as released, 3,993 requests,
about 22.5M distinct tokens), about 13%. On the Mooncake trace that *is* the
paper's setting; on the others it keeps the same ratio of cache to footprint.
A smaller share is shown for the Mooncake trace after the table.

Caveats: only the Mooncake file carries recorded prefix sharing. The Azure files
record lengths only, and `read_trace` gives them shared prefixes from a seeded
model (`traces.synthetic.PrefixModel`); the Bailian and BurstGPT files are this
project's synthetic samples. Their ratios describe that model, not a service.
The global pool needs a model shape only for the transfer time (`llama-3-8b`)."""
    ),
    new_code_cell(
        """bundled = [
    ("mooncake", "recorded"),
    ("bailian-synthetic-sample", "synthetic"),
    ("burstgpt-synthetic-sample", "synthetic"),
    ("azure-conv-sample", "modelled"),
    ("azure-code-sample", "modelled"),
]
traces = {name: read_trace(bundled_path(name)) for name, _ in bundled}
mc = traces["mooncake"]
mooncake_distinct_tokens = mc["block_hashes"].explode().n_unique() * mc["block_size"][0]
share = 100 * PAPER_NODE_TOKENS / mooncake_distinct_tokens
node_cache, pool_cache = f"{share:.2f}%", f"{NODES * share:.1f}%"
print(f"per-node cache: {node_cache} of each trace's distinct blocks; shared pool: {pool_cache}")"""
    ),
    new_code_cell(
        """rows = []
for name, sharing in bundled:
    t = traces[name]
    row = {"trace": name, "sharing": sharing, "ceiling": simulate(t, None).token_hit_ratio}
    for router, tag in [("round-robin", "rr"), ("cache-aware", "ca")]:
        local = simulate(
            t, node_cache, mode="concurrent", instances=NODES, router=router,
            fleet_options={"pooled": tag == "rr"},
        )
        shared = simulate(
            t, node_cache, mode="concurrent", instances=NODES, router=router,
            model_shape="llama-3-8b", fleet_options={"global_pool": pool_cache},
        )
        if tag == "rr":
            row["node_blocks"] = local.capacity_blocks
            row["one_pool"] = local.stats["pooled_hit_ratio"]
        row[f"local_{tag}"] = local.token_hit_ratio
        row[f"global_{tag}"] = shared.token_hit_ratio
        row[f"ratio_{tag}"] = shared.token_hit_ratio / local.token_hit_ratio
    rows.append(row)
fig10 = pl.DataFrame(rows).select(
    "trace", "sharing", "node_blocks", "ceiling", "one_pool",
    "local_rr", "global_rr", "ratio_rr", "local_ca", "global_ca", "ratio_ca",
)
fig10.with_columns(pl.col(pl.Float64).round(3))"""
    ),
    new_markdown_cell(
        """`_rr`: the nodes behind round-robin; `_ca`: behind SGLang's cache-aware router.
`ratio` = global / local, the paper's figure of merit; `ceiling` is the trace's
infinite-capacity hit ratio. Beside the paper's three figures:"""
    ),
    new_code_cell(
        """paper = [2.22, 1.38, 2.36]
bars = fig10.select(
    "trace",
    pl.col("ratio_rr").alias("round-robin nodes"),
    pl.col("ratio_ca").alias("cache-aware nodes"),
)
ax = bars.to_pandas().plot.bar(
    x="trace", figsize=(8, 3.8), rot=20, color=["#9ecae1", "#3182bd"],
    title=f"Global pool / local caches, {NODES} nodes",
)
for k, v in enumerate(paper):
    ax.axhline(v, color="#d62728", ls="--", lw=1, label="Mooncake paper, its 3 traces" if k == 0 else None)
ax.axhline(1.0, color="black", lw=0.8)
ax.set_ylabel("hit ratio, global / local")
ax.legend(fontsize=8);
print("paper, global / local:", " / ".join(f"{v}x" for v in paper))"""
    ),
    new_markdown_cell(
        """The Mooncake trace at a smaller node cache (a quarter and a half of the
paper-equivalent share, and the share itself), where the shared pool can no
longer hold the whole trace:"""
    ),
    new_code_cell(
        """sizes = []
for frac in (0.25, 0.5, 1.0):
    for router in ("round-robin", "cache-aware"):
        kw = dict(mode="concurrent", instances=NODES, router=router)
        local = simulate(traces["mooncake"], f"{frac * share:.2f}%", **kw)
        shared = simulate(
            traces["mooncake"], f"{frac * share:.2f}%", model_shape="llama-3-8b",
            fleet_options={"global_pool": f"{NODES * frac * share:.1f}%"}, **kw,
        )
        sizes.append({
            "node_tokens_M": frac * PAPER_NODE_TOKENS / 1e6, "router": router,
            "local": local.token_hit_ratio, "global": shared.token_hit_ratio,
            "ratio": shared.token_hit_ratio / local.token_hit_ratio,
            "ttft_p50_local_s": local.summary()["ttft_p50_s"],
            "ttft_p50_global_s": shared.summary()["ttft_p50_s"],
        })
pl.DataFrame(sizes).with_columns(pl.col(pl.Float64).round(3))"""
    ),
    new_markdown_cell(
        """## What this says, and what it does not

**Against the paper.** On the Mooncake trace at the paper's setting, 10 x 3M
tokens exceed the trace's 22.5M distinct tokens, so the shared pool holds
everything and the global hit ratio is the trace's ceiling (about 0.65). Behind
round-robin the local caches reach about 0.17, a ratio of about 3.7x: above
the paper's 1.38x-2.36x. Behind SGLang's cache-aware router the local caches
already reach the ceiling and the ratio is 1.0x. The paper's figures fall
between these two, which is what one would expect if its local baseline's
dispatch kept some, but not all, of a prefix's requests on the same node: the
gain of a global pool is largely the reuse a cache-blind dispatcher throws
away. We do not know the dispatch behind the paper's local numbers, nor which
of its three figures belongs to the synthetic trace, so this is a consistency
check, not a reproduction.

**Smaller caches.** With a quarter of the paper's cache per node the
round-robin ratio grows (about 7x): the less each node holds, the more a shared
pool is worth. With cache-aware routing it stays near 1.0x: affinity turns ten
separate caches into one partitioned cache, and partitioning costs little on a
trace whose prefixes each come from one root. The global pool still lowers the
TTFT median behind round-robin, because fetched blocks are not recomputed
(the link model, `sim.global_pool.GLOBAL_LINK`, is an illustrative 25 GB/s RDMA
figure, not a measurement).

**The other traces.** The ratios are smaller (about 1.1x on the Azure files,
1.4x-1.9x on the synthetic samples behind round-robin, at most about 1.1x
behind cache-aware): the local caches already get most of each ceiling (on the
Azure files 0.13 of 0.15 and 0.22 of 0.25), so a shared pool has little left
to add. Their shared prefixes come from a seeded model, so read these rows as
what that model implies, not as a property of Azure's or Bailian's traffic.

**Equal memory.** The sim's global pool sits on top of the local caches (twice
the memory); `one_pool` is the whole fleet's memory as one cache instead. At
this size both reach the ceiling, so the comparison does not hinge on that
choice here; at smaller sizes it can.

**What to take to a real fleet.** Replay your own trace (the `TRACE`
parameter) with your node count and cache size: if a prefix-aware router
already reaches the all-caches bound in part 1, a global pool buys little hit
ratio; if the router must stay cache-blind (or load balance forces requests
away from their prefix), the global pool recovers most of the difference."""
    ),
]


NAME = "03-fleet-routing.ipynb"


def main() -> Path:
    return write_notebook(CELLS, NAME)


if __name__ == "__main__":
    print(main())
