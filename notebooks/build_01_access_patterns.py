"""Builds ``01-access-patterns.ipynb`` (run: ``python notebooks/build_01_access_patterns.py``).

The notebook is generated, not hand-edited: change the cells here.
"""

from pathlib import Path

from _build import write_notebook
from nbformat.v4 import new_code_cell, new_markdown_cell

CELLS = [
    new_markdown_cell(
        """# 01 - KV-cache access patterns

What this notebook shows: which KV blocks a chat workload touches, when, and
whether the prefix cache already held them. The workload is the one behind
`sage-kv-stats demo`: a few shared **system prompts** (Zipf popularity) and
**multi-turn sessions** whose context grows by a reply and a user turn each
time, driven through the real `PrefixCache`. One access is recorded per
prompt block: hit or miss, its position in the prompt, the request, the
(simulated) time.

Everything is computed by the library (`sagellm_kv_cache.profiling`) and
drawn by `sim.analysis.plots`; this notebook defines no logic."""
    ),
    new_code_cell(
        """# parameters (papermill -p NAME VALUE): accesses to record, seed, cache size
NUM_ACCESSES = 5000
SEED = 0
MAX_CACHED_BLOCKS = 512""",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        """import polars as pl

from sim.analysis import plots
from sim.analysis.text import format_summary
from sagellm_kv_cache.profiling import AccessStatsCollector, analysis
from sim.demo_workload import run_demo_workload

%matplotlib inline"""
    ),
    new_markdown_cell(
        """## Run the workload and export it

5,000 block accesses, seed 0, 16-token blocks, a 512-block cache.
The export is Parquet (the cached intermediate result); the table is read
back with polars."""
    ),
    new_code_cell(
        """collector = run_demo_workload(
    NUM_ACCESSES, seed=SEED, block_size=16, max_cached_blocks=MAX_CACHED_BLOCKS
)
collector.export_stats("demo_stats.parquet")
events = pl.read_parquet("demo_stats.parquet")
events.head()"""
    ),
    new_code_cell(
        """print(format_summary(AccessStatsCollector.load("demo_stats.parquet").get_stats_summary()))"""
    ),
    new_markdown_cell(
        """## Heatmap: blocks by popularity over time

Rows are blocks ranked by how often they were accessed (rank 1 at the top;
neighbouring ranks share a row when there are many blocks). What to look
for: the **top rows are lit in almost every window**: those are the system
prompt blocks every session starts with. Lower rows light up in short
bursts: a session's own context, reused for a few turns and then never
again."""
    ),
    new_code_cell("""plots.plot_heatmap(events);"""),
    new_markdown_cell(
        """The same counts by **prompt position** instead of block: every request
touches positions 0..n, so low positions are hot in every window; the long
tail of high positions comes only from sessions many turns deep."""
    ),
    new_code_cell("""plots.plot_heatmap(events, by="position");"""),
    new_markdown_cell(
        """## Hits and misses over time

The first windows are mostly misses (a cold cache: every system prompt is
seen for the first time). Once the system prompts are cached, the block hit
ratio climbs and stays high; dips are windows where new sessions start and
bring their own, never-seen user turns."""
    ),
    new_code_cell(
        """timeline = analysis.hit_miss_timeline(events)
plots.plot_timeline(events);
timeline.head(10)"""
    ),
    new_markdown_cell(
        """## Hit ratio by prompt position

A prefix cache can only hit a block if it hit every block before it, so the
hit ratio **falls with position**: near 100% at the first blocks (the shared
system prompt), lower in the middle (the session's earlier turns, hit only
when the session continues), lowest at the tail (the newest user turn,
always a miss)."""
    ),
    new_code_cell(
        """plots.plot_position(events);
analysis.hit_ratio_by_position(events)"""
    ),
    new_markdown_cell(
        """## Reuse distance

The number of distinct other blocks touched between two accesses of the same
block. An LRU cache of `c` blocks hits exactly the reuses with distance below
`c`, so this histogram is the miss-ratio curve of every cache size at once:
the mass left of 512 (the demo's capacity) is what the cache could serve."""
    ),
    new_code_cell(
        """plots.plot_reuse(events);
analysis.reuse_distance_histogram(events)"""
    ),
    new_markdown_cell(
        """## Hottest blocks

The most accessed blocks are the first blocks of the most popular system
prompt (Zipf rank 1): every session using it touches all of them, and after
the first request they are always hits."""
    ),
    new_code_cell(
        """plots.plot_hot_blocks(events, n=20);
analysis.hottest_blocks(events, n=10)"""
    ),
]


NAME = "01-access-patterns.ipynb"


def main() -> Path:
    return write_notebook(CELLS, NAME)


if __name__ == "__main__":
    print(main())
