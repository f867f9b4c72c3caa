"""Eviction policy cost and hit ratios on the bundled Mooncake trace.

Every registered policy (``sagellm_kv_cache.eviction.registry.POLICIES``) plus
``leaf:lru`` and ``leaf:s3fifo`` replays the bundled Mooncake synthetic trace sequentially
(``sim.replay.replay_sequential``: lookup, touch hits, allocate, cache,
release, one request at a time) through the library's ``BlockPool`` at a
capacity that forces eviction. Reported per policy:

* ``seconds``: best of ``--repeat`` replays in CPU time of this process
  (``time.process_time``: other processes on a shared machine do not count;
  the trace is read once before), rounds interleaving the policies;
* ``policy_events``: calls the pool makes into the policy, counted per block
  (``add_many([a, b])`` counts 2; ``on_hit`` only when the policy tracks
  hits; ``on_cached`` / ``on_evicted`` only when it overrides them), from one
  extra untimed replay with counting wrappers on the instance;
* ``Mevents_per_s`` = policy_events / seconds (whole replay time: pool included);
* ``x_lru`` = seconds / LRU's seconds (goal: <= 3 for every policy);
* block and token hit ratios and evictions.

    python benchmarks/bench_eviction.py [--capacity 10000] [--repeat 5] [--policies lru,arc]
"""

from __future__ import annotations

import argparse
import time

from _util import print_table, write_json

_COUNTED = (
    "add",
    "add_many",
    "remove",
    "remove_many",
    "pop_victim",
    "pop_victims",
    "on_cached",
    "on_hit",
    "on_evicted",
    "on_removed",
)


def _counting(policy, counts: dict[str, int]):
    """Wrap the policy's methods on the instance (the pool's hook detection looks at the class)."""

    def wrap(name, fn):
        if name in ("add_many", "remove_many"):

            def w(ids):
                ids = list(ids)
                counts[name] += len(ids)
                return fn(ids)
        elif name == "pop_victims":

            def w(n):
                counts[name] += n
                return fn(n)
        else:

            def w(*args):
                counts[name] += 1
                return fn(*args)

        return w

    for name in _COUNTED:
        counts[name] = 0
        setattr(policy, name, wrap(name, getattr(policy, name)))
    return policy


def policy_names() -> list[str]:
    from sagellm_kv_cache.eviction.registry import POLICIES

    names = sorted(POLICIES)
    names.remove("lru")
    return ["lru", *names, "leaf:lru", "leaf:s3fifo"]


def main() -> None:
    from sagellm_kv_cache.eviction import make_policy
    from sim.replay import replay_sequential
    from traces import read_trace

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--capacity", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--policies", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args()
    names = [p for p in args.policies.split(",") if p] or policy_names()
    if "lru" not in names:
        names.insert(0, "lru")

    table = read_trace()
    counted, errors = {}, {}
    for name in names:
        try:
            counts: dict[str, int] = {}
            r = replay_sequential(table, args.capacity, _counting(make_policy(name), counts))
            counted[name] = (r, counts)
        except Exception as e:  # a policy that needs arguments: report, keep going
            errors[name] = f"{type(e).__name__}: {e}"
    # timed rounds interleave the policies, so load from other processes hits them alike
    best = dict.fromkeys(counted, float("inf"))
    for _ in range(args.repeat):
        for name in counted:
            t0 = time.process_time()
            replay_sequential(table, args.capacity, name)
            best[name] = min(best[name], time.process_time() - t0)
    rows, res = [], {}
    lru_s = best["lru"]
    for name in names:
        if name in errors:
            res[name] = {"error": errors[name]}
            rows.append({"policy": name, "note": errors[name]})
            continue
        r, counts = counted[name]
        events = sum(counts.values())
        sec = best[name]
        res[name] = {
            "seconds": sec,
            "policy_events": events,
            "events": counts,
            "events_per_s": events / sec,
            "x_lru": sec / lru_s,
            "block_hit_ratio": r.block_hit_ratio,
            "token_hit_ratio": r.token_hit_ratio,
            "evictions": r.evictions,
        }
        rows.append(
            {
                "policy": name,
                "seconds": sec,
                "x_lru": round(sec / lru_s, 2),
                "policy_events": events,
                "Mevents_per_s": events / sec / 1e6,
                "block_hit_ratio": round(r.block_hit_ratio, 4),
                "token_hit_ratio": round(r.token_hit_ratio, 4),
                "evictions": r.evictions,
            }
        )
    cols = max((list(r) for r in rows), key=len)
    rows = [{c: r.get(c, "") for c in cols} for r in rows]
    print_table(
        rows,
        f"sequential replay per eviction policy, Mooncake synthetic trace, "
        f"{args.capacity:,} blocks (best of {args.repeat})",
    )
    slow = [n for n, v in res.items() if v.get("x_lru", 0) > 3]
    print(f"\npolicies more than 3x slower than LRU: {slow or 'none'}")
    write_json(
        "eviction",
        {
            "capacity_blocks": args.capacity,
            "repeat": args.repeat,
            "num_requests": len(table),
            "results": res,
            "slower_than_3x_lru": slow,
        },
    )


if __name__ == "__main__":
    main()
