"""Eviction policy cost: whole replays on the bundled Mooncake trace, and the cost of a plan.

Every registered policy (``sagellm_kv_cache.eviction.registry.POLICIES``) plus
``leaf:lru`` and ``leaf:s3fifo``:

1. replays the bundled Mooncake synthetic trace sequentially
   (``sim.replay.replay_sequential``: lookup, touch hits, allocate, cache,
   release, one request at a time) through the library's ``BlockPool`` at a
   capacity that forces eviction. Reported per policy:

   * ``seconds``: best of ``--repeat`` replays in CPU time of the process
     (``time.process_time``: other processes on a shared machine do not
     count; the trace is read once before), rounds interleaving the policies;
   * ``policy_events``: calls the pool makes into the policy, counted per block
     (``add_many([a, b])`` counts 2; ``on_hit`` only when the policy tracks
     hits; ``on_cached`` / ``on_evicted`` only when it overrides them), from one
     extra untimed replay with counting wrappers on the instance;
   * ``Mevents_per_s`` = policy_events / seconds (whole replay time: pool included);
   * ``x_lru`` = seconds / LRU's seconds (goal: <= 3 for every policy);
   * block and token hit ratios and evictions.

2. measures a plan (``peek_victims(32)``, what the offload manager and the
   scheduler ask) at 1k and at 100k evictable blocks: the policy is fed
   directly (chains of 8 blocks cached prefix first, one block in 5 hit, all
   released tail-first), then ``peek_victims(32)`` is timed; ``peek_x`` =
   100k / 1k cost per plan (goal: <= 1.2, the cost is flat in the evictable count).

``--baseline DIR`` runs every round twice, once on this tree and once on the
checkout ``DIR`` (``git worktree add /tmp/base REV``), each in a fresh
subprocess, rounds interleaved, and adds ``before_s`` / ``speedup`` columns::

    python benchmarks/bench_eviction.py [--capacity 10000] [--repeat 5] [--policies lru,arc]
    python benchmarks/bench_eviction.py --baseline /tmp/base --repeat 3
"""

from __future__ import annotations

import argparse
import json
import time

from _util import ROOT, SMOKE, parse_args, print_table, run_worker, write_json

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
PEEK_K = 32
PEEK_SIZES = (1_000, 100_000)


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


def filled_policy(name: str, n: int):
    """A policy holding ``n`` evictable blocks: chains of 8 cached prefix first, one block
    in 5 hit, every chain released tail-first (as a pool releases a request)."""
    from sagellm_kv_cache.eviction import make_policy

    p = make_policy(name, clock=lambda: 0.0)
    p.set_capacity(n)
    for b in range(n):
        p.on_cached(b, ("h", b), b - 1 if b % 8 else -1)
    if p.tracks_hits:
        for b in range(0, n, 5):
            p.on_hit(b)
    for start in range(0, n, 8):
        p.add_many(reversed(range(start, min(start + 8, n))))
    return p


def peek_seconds(name: str, n: int) -> float:
    """CPU seconds per ``peek_victims(PEEK_K)`` on a policy holding ``n`` evictable blocks
    (best of 3 batches of about 50 ms each)."""
    p = filled_policy(name, n)
    peek = p.peek_victims
    t0 = time.process_time()
    peek(PEEK_K)
    calls = 3 if SMOKE else max(3, min(2000, int(0.05 / max(time.process_time() - t0, 1e-6))))
    best = float("inf")
    for _ in range(1 if SMOKE else 3):
        t0 = time.process_time()
        for _ in range(calls):
            peek(PEEK_K)
        best = min(best, (time.process_time() - t0) / calls)
    return best


def worker(names: list[str], capacity: int, counted: bool) -> dict:
    """One round on the ``sagellm_kv_cache`` first on ``sys.path``: replay seconds (and the
    event counts and ratios when ``counted``) and peek costs, per policy."""
    from sagellm_kv_cache.eviction import make_policy
    from sim.replay import replay_sequential
    from traces import read_trace

    table = read_trace()
    # warm-up: what a replay imports lazily is imported (and compiled, where bytecode is
    # not cached) before any clock starts, so the first policy timed pays none of it
    replay_sequential(table.head(50), capacity, "lru")
    out: dict[str, dict] = {}
    for name in names:
        try:
            row: dict = {}
            if counted:
                counts: dict[str, int] = {}
                r = replay_sequential(table, capacity, _counting(make_policy(name), counts))
                row.update(
                    events=counts,
                    block_hit_ratio=r.block_hit_ratio,
                    token_hit_ratio=r.token_hit_ratio,
                    evictions=r.evictions,
                )
            t0 = time.process_time()
            replay_sequential(table, capacity, name)
            row["seconds"] = time.process_time() - t0
            for n in PEEK_SIZES:
                row[f"peek_{n}_s"] = peek_seconds(name, n)
            out[name] = row
        except Exception as e:  # a policy that needs arguments: report, keep going
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return {"num_requests": len(table), "results": out}


def run_round(src: str, names: list[str], capacity: int, counted: bool) -> dict:
    """``worker`` in a fresh interpreter importing the library (and ``sim``, ``traces``) from
    the checkout ``src``."""
    args = ["--worker", "--capacity", str(capacity), "--policies", ",".join(names)]
    return run_worker(__file__, src, args + (["--counted"] if counted else []))


def _best(rounds: list[dict], name: str, key: str) -> float:
    return min(r["results"][name].get(key, float("inf")) for r in rounds)


def main() -> None:
    args = parse_args(
        __doc__,
        capacity=10_000,
        repeat=5,
        policies=("", "comma-separated subset (default: all)"),
        baseline=("", "a checkout to measure against (subprocess)"),
        worker=(False, argparse.SUPPRESS),
        counted=(False, argparse.SUPPRESS),
    )
    if args.worker:
        names = args.policies.split(",")
        print(json.dumps(worker(names, args.capacity, args.counted)))
        return
    names = [p for p in args.policies.split(",") if p] or policy_names()
    if "lru" not in names:
        names.insert(0, "lru")

    after: list[dict] = []
    before: list[dict] = []
    # rounds interleave the trees, so load from other processes hits them alike
    for i in range(args.repeat):
        after.append(run_round(str(ROOT), names, args.capacity, counted=i == 0))
        if args.baseline:
            before.append(run_round(args.baseline, names, args.capacity, counted=False))
    first = after[0]["results"]
    rows, res = [], {}
    lru_s = _best(after, "lru", "seconds")
    for name in names:
        if "error" in first[name]:
            res[name] = {"error": first[name]["error"]}
            rows.append({"policy": name, "note": first[name]["error"]})
            continue
        sec = _best(after, name, "seconds")
        events = sum(first[name]["events"].values())
        p1, p2 = (_best(after, name, f"peek_{n}_s") for n in PEEK_SIZES)
        res[name] = {
            **first[name],
            "seconds": sec,
            "policy_events": events,
            "events_per_s": events / sec,
            "x_lru": sec / lru_s,
            "peek_us": {n: _best(after, name, f"peek_{n}_s") * 1e6 for n in PEEK_SIZES},
            "peek_x": p2 / p1,
        }
        row = {
            "policy": name,
            "seconds": sec,
            "x_lru": round(sec / lru_s, 2),
            "Mevents_per_s": events / sec / 1e6,
            "block_hit_ratio": round(first[name]["block_hit_ratio"], 4),
            "evictions": first[name]["evictions"],
            "peek1k_us": p1 * 1e6,
            "peek100k_us": p2 * 1e6,
            "peek_x": round(p2 / p1, 2),
        }
        if before and "error" not in before[0]["results"].get(name, {"error": 1}):
            b_sec = _best(before, name, "seconds")
            b1, b2 = (_best(before, name, f"peek_{n}_s") for n in PEEK_SIZES)
            res[name]["before"] = {
                "seconds": b_sec,
                "peek_us": {1_000: b1 * 1e6, 100_000: b2 * 1e6},
            }
            row.update(
                before_s=b_sec,
                speedup=round(b_sec / sec, 2),
                before_peek100k_us=b2 * 1e6,
                before_peek_x=round(b2 / b1, 2),
            )
        rows.append(row)
    cols = max((list(r) for r in rows), key=len)
    rows = [{c: r.get(c, "") for c in cols} for r in rows]
    print_table(
        rows,
        f"sequential replay per eviction policy, Mooncake synthetic trace, "
        f"{args.capacity:,} blocks (best of {args.repeat}); peek_victims({PEEK_K}) per plan",
    )
    slow = [n for n, v in res.items() if v.get("x_lru", 0) > 3]
    steep = [n for n, v in res.items() if v.get("peek_x", 0) > 1.2]
    print(f"\npolicies more than 3x slower than LRU: {slow or 'none'}")
    print(f"plans more than 1.2x dearer at 100k than at 1k evictable blocks: {steep or 'none'}")
    write_json(
        "eviction",
        {
            "capacity_blocks": args.capacity,
            "repeat": args.repeat,
            "baseline": args.baseline or None,
            "num_requests": after[0]["num_requests"],
            "results": res,
            "slower_than_3x_lru": slow,
            "peek_steeper_than_1_2x": steep,
        },
    )


if __name__ == "__main__":
    main()
