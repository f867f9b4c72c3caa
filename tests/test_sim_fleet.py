"""The fleet (N instances behind a router on one clock): exact equalities and bounds."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVConfigError
from sim.config import LinearCostModel
from sim.routers import ROUTERS, parse_router
from sim.simulate import simulate

TRACE = "traces/data/mooncake_synthetic_trace.jsonl"
COLS = ["hit_blocks", "allocated_blocks", "evicted_blocks", "rejected"]
TIMED = ["start_s", "prefill_end_s", "finish_s"]
ZERO = LinearCostModel.zero()


@pytest.fixture(scope="module")
def trace():
    from traces import read_trace

    return read_trace(TRACE).head(500)


def same(a: pl.DataFrame, b: pl.DataFrame, cols: list[str]) -> None:
    for c in cols:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), c


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
@pytest.mark.parametrize("cost", [ZERO, None], ids=["zero", "default"])
@pytest.mark.parametrize("n", [2, 3])
def test_round_robin_equals_each_subsequence_alone(trace, mode, cost, n):
    fleet = simulate(trace, 300, mode=mode, cost=cost, instances=n, router="round-robin")
    recs = fleet.records.with_row_index("row")
    assert recs["instance"].to_list() == [i % n for i in range(len(trace))]
    cols = COLS + (TIMED if mode == "concurrent" else [])
    for k in range(n):
        sub = trace.with_row_index("row").filter(pl.col("row") % n == k).drop("row")
        alone = simulate(sub, 300, mode=mode, cost=cost)
        same(recs.filter(pl.col("instance") == k), alone.records, cols)
        per = fleet.per_instance[k]
        assert per["requests"] == len(sub)
        assert per["token_hit_ratio"] == pytest.approx(alone.token_hit_ratio)


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_one_instance_under_any_router_is_the_single_replay(trace, mode, router):
    one = simulate(trace, 300, mode=mode, instances=1, router=router)
    ref = simulate(trace, 300, mode=mode)
    same(one.records, ref.records, COLS + (TIMED if mode == "concurrent" else []))
    assert one.token_hit_ratio == ref.token_hit_ratio
    assert one.all_caches_hit_ratio == ref.token_hit_ratio  # the bound is tight at N = 1
    assert one.load_imbalance == 1.0


class AlwaysZero:
    """A router that sends everything to instance 0."""

    last_matches = None

    def select_device(self, candidates, kv_tokens_required=0, request_id=None, **kw):
        return candidates[0]


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_router_always_zero_equals_one_instance(trace, mode):
    fleet = simulate(trace, 300, mode=mode, instances=4, router=AlwaysZero())
    ref = simulate(trace, 300, mode=mode)
    same(fleet.records, ref.records, COLS + (TIMED if mode == "concurrent" else []))
    assert set(fleet.records["instance"].to_list()) == {0}
    assert [r["requests"] for r in fleet.per_instance] == [len(trace), 0, 0, 0]
    assert fleet.load_imbalance == 4.0


def test_prefix_aware_beat_round_robin_and_bounds_hold(trace):
    out = {}
    for r in ("round-robin", "longest-prefix", "kv-aware", "cache-aware"):
        s = simulate(trace, 300, mode="concurrent", instances=4, router=r).summary()
        out[r] = s
        assert s["best_instance_hit_ratio"] >= s["routed_hit_ratio"]
        assert s["regret_hit_ratio"] == pytest.approx(
            s["best_instance_hit_ratio"] - s["routed_hit_ratio"]
        )
        assert s["all_caches_hit_ratio"] >= s["token_hit_ratio"]
        assert len(s["per_instance"]) == 4
        assert {"ttft_p50_s", "queue_p99_s", "peak_blocks_in_use"} <= set(s["per_instance"][0])
    for r in ("longest-prefix", "kv-aware", "cache-aware"):
        assert out[r]["token_hit_ratio"] > out["round-robin"]["token_hit_ratio"]


def test_records_and_config(trace, tmp_path):
    r = simulate(trace, 300, instances=2, router="kv-aware:weight=2,temperature=0")
    assert r.config["router"] == "kv-aware:weight=2.0,temperature=0.0"
    assert r.config["instances"] == 2 and r.instances == 2
    assert {"instance", "routed_blocks", "best_blocks", "held_blocks"} <= set(r.records.columns)
    h = r.records
    assert (h["held_blocks"] >= h["hit_blocks"]).all()
    assert (h["best_blocks"] >= h["routed_blocks"]).all()
    assert "summary.json" in r.write(tmp_path)


def test_pooled_what_if(trace):
    r = simulate(trace, 300, instances=2, router="longest-prefix", fleet_options={"pooled": True})
    assert r.pooled_hit_ratio == simulate(trace, 600).token_hit_ratio


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"instances": 0}, "instances"),
        ({"instances": True}, "instances"),
        ({"router": "nope"}, "unknown router"),
        ({"router": "kv-aware:weight=x"}, "weight"),
        ({"router": "kv-aware:color=1"}, "bad parameter"),
        ({"router": "consistent-hash:key=user"}, "key"),
        ({"router": "kv-aware:temperature=-1"}, "temperature"),
        ({"instances": 2, "tiers": {"gpu": 10, "cpu": 20}}, "tiers"),
    ],
)
def test_bad_fleet_settings(trace, kwargs, needle):
    with pytest.raises(KVConfigError) as ei:
        simulate(trace.head(5), 300, **kwargs)
    assert needle in str(ei.value) and ei.value.code == "KV_CONFIG_INVALID"


def test_parse_router_labels():
    assert parse_router("round_robin").label == "round-robin"
    assert parse_router("consistent-hash:key=prefix").label == "consistent-hash:key=prefix"


# ---------------------------------------------------------------- property: the bound

BS = 4


@st.composite
def small_trace(draw):
    """Requests over a few shared prefixes (chained ids), random lengths and times."""
    n = draw(st.integers(1, 40))
    rows = []
    t = 0.0
    for i in range(n):
        root = draw(st.integers(0, 4))
        shared = draw(st.integers(0, 5))
        own = draw(st.integers(0, 3))
        hashes = [f"r{root}-{j}" for j in range(shared)] + [f"q{i}-{j}" for j in range(own)]
        tail = draw(st.integers(0, BS - 1))
        t += draw(st.sampled_from([0.0, 0.01, 0.5]))
        rows.append(
            {
                "request_id": f"q{i}",
                "arrival_s": t,
                "input_length": len(hashes) * BS + tail,
                "output_length": draw(st.integers(0, 20)),
                "block_hashes": hashes,
                "block_size": BS,
                "session_id": f"s{draw(st.integers(0, 3))}",
            }
        )
    return pl.DataFrame(rows)


@settings(max_examples=60, deadline=None)
@given(
    table=small_trace(),
    n=st.integers(1, 4),
    cap=st.integers(1, 12),
    router=st.sampled_from(sorted(ROUTERS) + ["kv-aware:temperature=0.5,seed=3"]),
    mode=st.sampled_from(["sequential", "concurrent"]),
)
def test_all_caches_bound_holds(table, n, cap, router, mode):
    r = simulate(table, cap, mode=mode, instances=n, router=router)
    assert r.all_caches_hit_ratio >= r.token_hit_ratio
    assert r.best_instance_hit_ratio >= r.routed_hit_ratio
    recs = r.records
    assert (recs["held_blocks"] >= recs["hit_blocks"]).all()
    if n == 1:
        ref = simulate(table, cap, mode=mode)
        assert r.all_caches_hit_ratio == r.token_hit_ratio == ref.token_hit_ratio


# ---------------------------------------------------------------- CLI


def test_cli_replay_fleet(tmp_path):
    import json

    from click.testing import CliRunner

    from cli.main import cli

    out = tmp_path / "r"
    res = CliRunner().invoke(
        cli,
        [
            "replay",
            "--mode",
            "concurrent",
            "--capacity",
            "300",
            "--instances",
            "3",
            "--router",
            "longest-prefix",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "instances            3  router longest-prefix" in res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["instances"] == 3 and len(s["per_instance"]) == 3
    assert s["all_caches_hit_ratio"] >= s["token_hit_ratio"]
    recs = pl.read_parquet(out / "records.parquet")
    assert sorted(set(recs["instance"].to_list())) == [0, 1, 2]
    assert (out / "instances.png").exists()
    assert json.loads((out / "config.json").read_text())["router"] == "longest-prefix"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--router", "nope"], "--router"),
        (["--router", "kv-aware:weight=x"], "--router"),
        (["--instances", "0"], "--instances"),
    ],
)
def test_cli_replay_fleet_mistakes_are_one_error_line(tmp_path, args, needle):
    from click.testing import CliRunner

    from cli.main import cli

    res = CliRunner().invoke(cli, ["replay", "--out", str(tmp_path / "x"), *args])
    assert res.exit_code == 2
    errs = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errs) == 1 and needle in errs[0]


def test_cli_sweep_routers_and_instances(tmp_path):
    from click.testing import CliRunner

    from cli._fleet import split_routers
    from cli.main import cli

    assert split_routers("round-robin,kv-aware:weight=1,temperature=0,cache-aware") == [
        "round-robin",
        "kv-aware:weight=1,temperature=0",
        "cache-aware",
    ]
    out = tmp_path / "s"
    res = CliRunner().invoke(
        cli,
        [
            "sweep",
            "--mode",
            "concurrent",
            "--capacities",
            "200",
            "--instances",
            "1,2",
            "--routers",
            "round-robin,longest-prefix",
            "--executor",
            "serial",
            "--no-bounds",
            "--out",
            str(out),
            "--no-progress",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    df = pl.read_parquet(out / "sweep.parquet")
    assert df["setting"].to_list() == [
        "instances=1,router=round-robin",
        "instances=1,router=longest-prefix",
        "instances=2,router=round-robin",
        "instances=2,router=longest-prefix",
    ]
    h = df["token_hit_ratio"].to_list()
    assert h[0] == h[1]  # one instance: the router does not matter
    assert df["load_imbalance"].to_list()[:2] == [1.0, 1.0]
    assert (out / "routers.png").exists()
    bad = CliRunner().invoke(cli, ["sweep", "--routers", "nope", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--routers" in bad.output


# ---------------------------------------------------------------- global pool


def tiny(rows: list[list[str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "request_id": f"q{i}",
                "arrival_s": float(i),
                "input_length": len(h) * BS,
                "output_length": 1,
                "block_hashes": h,
                "block_size": BS,
            }
            for i, h in enumerate(rows)
        ]
    )


def test_global_pool_hit_on_another_instance_with_link_time():
    from sagellm_kv_cache.storage import ModelShape
    from sim.global_pool import GLOBAL_LINK
    from sim.tiered import ttft_model

    table = tiny([["a", "b", "c"], ["a", "b", "c", "d"]])
    cost = LinearCostModel(1e-3, 0.0, 0.0, 0.0)
    base = simulate(table, 10, cost=cost, instances=2, router="round-robin")
    assert base.records["hit_blocks"].to_list() == [0, 0]  # round-robin: two cold caches
    r = simulate(
        table,
        10,
        cost=cost,
        instances=2,
        router="round-robin",
        model_shape="llama-3-8b",
        fleet_options={"global_pool": 10},
    )
    rec = r.records
    assert rec["instance"].to_list() == [0, 1]
    assert rec["hit_blocks"].to_list() == [0, 3]
    assert rec["hit_blocks_global"].to_list() == [0, 3]
    assert rec["hit_blocks_gpu"].to_list() == [0, 0]
    shape = ModelShape.named("llama-3-8b")
    load = GLOBAL_LINK.load_s(3 * shape.bytes_per_block(BS))
    want = ttft_model(load, 1e-3 * BS, shape.num_layers, True)
    assert rec["prefill_s"].to_list()[1] == pytest.approx(want)
    assert r.global_hit_ratio == pytest.approx(3 / 7)
    assert r.all_caches_hit_ratio >= r.token_hit_ratio


def test_global_pool_needs_a_model_shape(trace):
    with pytest.raises(KVConfigError) as ei:
        simulate(trace.head(3), 100, instances=2, fleet_options={"global_pool": 100})
    assert "model shape" in str(ei.value)


@settings(max_examples=30, deadline=None)
@given(
    table=small_trace(),
    n=st.integers(1, 3),
    cap=st.integers(1, 8),
    gcap=st.integers(1, 16),
    router=st.sampled_from(["round-robin", "longest-prefix", "cache-aware"]),
    mode=st.sampled_from(["sequential", "concurrent"]),
)
def test_global_pool_bound_holds(table, n, cap, gcap, router, mode):
    r = simulate(
        table,
        cap,
        mode=mode,
        instances=n,
        router=router,
        model_shape="llama-3-8b",
        fleet_options={"global_pool": gcap},
    )
    recs = r.records
    assert (recs["held_blocks"] >= recs["hit_blocks"]).all()
    assert (recs["hit_blocks"] == recs["hit_blocks_gpu"] + recs["hit_blocks_global"]).all()


def test_cli_replay_global_pool(tmp_path):
    import json

    from click.testing import CliRunner

    from cli.main import cli

    out = tmp_path / "g"
    args = ["replay", "--capacity", "300", "--instances", "2", "--global-pool", "600"]
    res = CliRunner().invoke(
        cli, [*args, "--model-shape", "llama-3-8b", "--out", str(out), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["global_pool_blocks"] == 600 and s["global_hit_ratio"] > 0
    assert "global pool          600 blocks" in res.output
    bad = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--global-pool" in bad.output


def test_per_instance_timings_are_each_instances_own(trace):
    """Per-instance queue and TTFT percentiles equal ``timing_stats`` over the
    records routed to that instance (an instance with none: zeros)."""
    from sim.result import timing_stats

    res = simulate(trace, 300, mode="concurrent", instances=5, router="longest-prefix")
    rec = res.records
    for k, row in enumerate(res.summary()["per_instance"]):
        mine = rec.filter(pl.col("instance") == k)
        assert row["requests"] == mine.height
        for name in ("queue_s", "ttft_s"):
            st = timing_stats(name, mine[name].cast(float).to_numpy())
            base = name[:-2]
            assert row[f"{base}_p50_s"] == st[f"{base}_p50_s"]
            assert row[f"{base}_p99_s"] == st[f"{base}_p99_s"]


@settings(max_examples=60, deadline=None)
@given(table=small_trace(), n=st.integers(1, 5), cap=st.integers(1, 12))
def test_round_robin_bounds_are_the_caches_at_routing_time(table, n, cap):
    """Sequential round-robin: each request's routed, best-instance and all-caches runs
    equal those read off N bare LRU pools that serve the same requests in turn (the
    leading run its instance holds, the longest any one holds, and the leading run
    of blocks each held by some pool), request for request."""
    from sagellm_kv_cache.block_pool import BlockPool

    table = table.with_columns((pl.col("block_hashes").list.len() * BS).alias("input_length"))
    r = simulate(table, cap, mode="sequential", instances=n, router="round-robin")
    pools = [BlockPool(cap, BS) for _ in range(n)]
    routed, best, held = [], [], []
    for i, hs in enumerate(table["block_hashes"].to_list()):
        runs = [len(p.match_prefix(hs)) for p in pools]
        j = 0
        while j < len(hs) and any(hs[j] in p.cached for p in pools):
            j += 1
        routed.append(runs[i % n] if hs else 0)
        best.append(max(runs) if hs else 0)
        held.append(j if len(hs) <= cap else 0)
        if hs and len(hs) <= cap:
            pools[i % n].serve(hs)
    recs = r.records
    assert recs["instance"].to_list() == [i % n for i in range(len(routed))]
    assert recs["routed_blocks"].to_list() == routed
    assert recs["best_blocks"].to_list() == best
    assert recs["held_blocks"].to_list() == held
