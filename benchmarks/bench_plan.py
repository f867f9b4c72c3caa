"""Cost of one plan against the number of evictable device blocks (1k vs 100k).

Two plans, both metadata-only (no KV bytes), on a device pool whose every
block is cached and evictable:

* ``scheduler``: ``SchedulerBridge.plan`` of a batch of requests that miss
  and need victims (changes nothing, so each repetition plans the same state);
* ``offload``: ``KVOffloadManager.allocate`` of a missing request (its
  victims spill into a host tier) then ``free`` (its blocks stay cached: the
  evictable count is back where it was).

A plan that peeks only as many victims as it needs costs the same at 1k and
100k evictable blocks; one that walks the evictable set grows 100x. The
ratio column is (cost per plan at the large size) / (at the small size).

    python benchmarks/bench_plan.py [--small 1000] [--large 100000] [--policies lru,fifo,lfu]

Prints a table and writes ``benchmarks/results/plan.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _util import SMOKE, print_table, write_json

from sagellm_kv_cache.offload import KVOffloadManager
from sagellm_kv_cache.scheduler import SchedRequest, SchedulerBridge

BLOCK_SIZE = 16
REQ_BLOCKS = 4  # blocks per planned request
BATCH = 8  # requests per scheduler plan


def _fill(allocate, free, num_blocks: int) -> None:
    """Cache every device block with ref 0: one request per ``REQ_BLOCKS`` blocks."""
    for i in range(num_blocks // REQ_BLOCKS):
        hashes = [f"fill-{i}-{j}".encode() for j in range(REQ_BLOCKS)]
        free(allocate(f"fill-{i}", hashes))


def scheduler_plan_s(num_blocks: int, policy: str, repeat: int) -> float:
    bridge = SchedulerBridge(num_blocks * BLOCK_SIZE, BLOCK_SIZE, eviction_policy=policy)

    def allocate(rid, hashes):
        bridge.allocate_request(rid, REQ_BLOCKS * BLOCK_SIZE, block_hashes=hashes)
        return rid

    _fill(allocate, bridge.free_request, num_blocks)
    batch = [
        SchedRequest(
            f"r{i}",
            REQ_BLOCKS * BLOCK_SIZE,
            block_hashes=[f"new-{i}-{j}".encode() for j in range(REQ_BLOCKS)],
        )
        for i in range(BATCH)
    ]
    plan = bridge.plan(batch)
    assert len(plan.admitted) == BATCH and plan.admitted[0].blocks_to_evict == REQ_BLOCKS
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        bridge.plan(batch)
        times.append(time.perf_counter() - t0)
    bridge.close()
    return statistics.median(times)


def offload_plan_s(num_blocks: int, policy: str, repeat: int) -> float:
    m = KVOffloadManager.from_capacities(
        {"gpu": num_blocks, "cpu": num_blocks}, block_size=BLOCK_SIZE, eviction_policy=policy
    )

    def allocate(rid, hashes):
        return m.allocate(block_hashes=hashes, num_tokens=REQ_BLOCKS * BLOCK_SIZE).handle

    def free(handle):
        m.cache_blocks(handle)
        m.free(handle)

    _fill(allocate, free, num_blocks)
    times = []
    for r in range(repeat):
        hashes = [f"miss-{r}-{j}".encode() for j in range(REQ_BLOCKS)]
        t0 = time.perf_counter()
        a = m.allocate(block_hashes=hashes, num_tokens=REQ_BLOCKS * BLOCK_SIZE)
        m.cache_blocks(a.handle)
        m.free(a.handle)
        times.append(time.perf_counter() - t0)
        assert len(a.evicted_hashes) == REQ_BLOCKS
    m.close()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--policies", default="lru,fifo,lfu")
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    repeat = 1 if SMOKE else args.repeat
    rows = []
    for policy in args.policies.split(","):
        for name, fn in (("scheduler", scheduler_plan_s), ("offload", offload_plan_s)):
            small = fn(args.small, policy, repeat)
            large = fn(args.large, policy, repeat)
            rows.append(
                {
                    "plan": name,
                    "policy": policy,
                    f"us @ {args.small}": small * 1e6,
                    f"us @ {args.large}": large * 1e6,
                    "ratio": large / small,
                }
            )
    print_table(rows, f"cost per plan (median of {repeat}), evictable device blocks")
    write_json(
        "plan",
        {
            "small": args.small,
            "large": args.large,
            "repeat": repeat,
            "block_size": BLOCK_SIZE,
            "req_blocks": REQ_BLOCKS,
            "batch": BATCH,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
