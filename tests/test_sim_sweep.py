"""sim.sweep: rows equal direct replays, identical across executors, fixed order, typed errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError
from sim.replay import replay_sequential
from sim.sweep import SWEEP_COLUMNS, SweepJobError, sweep
from traces import DEFAULT_TRACE, read_trace

CAPS = [40, 150, 600]
POLICIES = ["lru", "fifo"]
#: the result columns a sweep row must carry exactly as a direct replay gives them:
#: SWEEP_COLUMNS from the token hit ratio to the eviction count
EXACT = list(
    SWEEP_COLUMNS[SWEEP_COLUMNS.index("token_hit_ratio") : SWEEP_COLUMNS.index("evictions") + 1]
)
assert len(EXACT) == 9 and "seconds" not in EXACT


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver():
    """The process executor forks workers from multiprocessing's forkserver; stop it after."""
    yield
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)
    if stop is not None:
        stop()


@pytest.fixture(scope="module")
def small():
    """The bundled Mooncake trace's first 300 requests (real prefix sharing, fast replays)."""
    return read_trace(DEFAULT_TRACE).head(300)


@pytest.fixture(scope="module")
def other(small):
    """A second trace: requests 300..500."""
    return read_trace(DEFAULT_TRACE).slice(300, 200)


def _policies(*names):
    from sagellm_kv_cache.eviction.registry import list_policies

    known = list_policies()
    return [n for n in names if n in known]


def table_from(requests: list[tuple[int, list[int]]], block_size: int = 4) -> pl.DataFrame:
    """A canonical table from ``(input_length, hash_ids)`` pairs."""
    n = len(requests)
    return pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "arrival_s": [float(i) for i in range(n)],
            "input_length": [length for length, _ in requests],
            "output_length": [1] * n,
            "block_hashes": pl.Series([h for _, h in requests], dtype=pl.List(pl.Int64)),
            "block_size": [block_size] * n,
        },
        schema_overrides={"input_length": pl.Int64, "output_length": pl.Int64},
    )


def _key(df: pl.DataFrame) -> list[tuple]:
    return df.select("trace", "policy", "kind", "capacity_blocks", *EXACT).rows()


def test_serial_rows_equal_direct_replays(small, other):
    pols = _policies(*POLICIES)
    df = sweep([("a", small), ("b", other)], CAPS, pols, executor="serial", progress=False)
    assert tuple(df.columns) == SWEEP_COLUMNS
    policy_rows = df.filter(pl.col("kind") == "policy")
    assert policy_rows.select("trace", "policy", "capacity_blocks").rows() == [
        (t, p, c) for t in ("a", "b") for p in pols for c in CAPS
    ]
    tables = {"a": small, "b": other}
    for row in policy_rows.iter_rows(named=True):
        r = replay_sequential(tables[row["trace"]], row["capacity_blocks"], row["policy"])
        for col in EXACT:
            assert row[col] == getattr(r, col), (row["trace"], row["policy"], col)
    inf = df.filter(pl.col("policy") == "infinite")
    assert inf.select("trace", "kind", "capacity_blocks").rows() == [
        (t, "bound", c) for t in ("a", "b") for c in CAPS
    ]
    for row in inf.iter_rows(named=True):
        r = replay_sequential(tables[row["trace"]], None)
        assert (row["hit_blocks"], row["full_blocks"], row["evictions"]) == (
            r.hit_blocks,
            r.full_blocks,
            0,
        )
        assert row["token_hit_ratio"] == r.token_hit_ratio
    assert (df["seconds"] >= 0).all() and (df["cpu_seconds"] >= 0).all()


def test_row_order_is_traces_then_policies_then_capacities_then_bounds(small):
    df = sweep([("t", small)], [300, 20], ["lru"], executor="serial", progress=False)
    expected = [("lru", "policy", 300), ("lru", "policy", 20)]
    expected += [("opt", "bound", 300), ("opt", "bound", 20)]
    expected += [("infinite", "bound", 300), ("infinite", "bound", 20)]
    assert df.select("policy", "kind", "capacity_blocks").rows() == expected


def test_process_executor_matches_serial_exactly(small, other):
    pols = _policies(*POLICIES)
    serial = sweep([("a", small), ("b", other)], CAPS, pols, executor="serial", progress=False)
    proc = sweep(
        [("a", small), ("b", other)], CAPS, pols, executor="process", workers=2, progress=False
    )
    assert _key(proc) == _key(serial)


def test_paths_are_read_and_named_by_file_name(tmp_path, small):
    lines = DEFAULT_TRACE.read_text().splitlines()[:50]
    p = tmp_path / "tiny.jsonl"
    p.write_text("\n".join(lines) + "\n")
    df = sweep([p, str(p)], [30], ["lru"], executor="serial", bounds=False, progress=False)
    assert df["trace"].to_list() == ["tiny.jsonl", "tiny.jsonl#2"]
    assert (
        df["hit_blocks"][0]
        == df["hit_blocks"][1]
        == replay_sequential(small.head(50), 30).hit_blocks
    )


def test_hand_checkable_trace():
    # block size 4; capacity 3: the 4th request finds 1, 2 cached and 3 evicted (LRU tail-first)
    t = table_from([(8, [1, 2]), (14, [1, 2, 3, 4]), (4, [9]), (12, [1, 2, 3])])
    df = sweep([("h", t)], [3, 100], ["lru"], executor="serial", progress=False)
    lru = df.filter(pl.col("policy") == "lru")
    assert lru["hit_blocks"].to_list() == [4, 5]
    assert lru["full_blocks"].to_list() == [9, 9]
    inf = df.filter(pl.col("policy") == "infinite")
    assert inf["hit_blocks"].to_list() == [5, 5]
    assert inf["capacity_blocks"].to_list() == [3, 100]


def test_numpy_capacities_and_duplicates(small):
    import numpy as np

    df = sweep(
        [("t", small)],
        np.array([50, 20, 50]),
        "lru",
        executor="serial",
        bounds=False,
        progress=False,
    )
    assert df["capacity_blocks"].to_list() == [50, 20]


def test_no_bounds_and_infinite_only(small):
    df = sweep([("t", small)], [50], ["lru"], executor="serial", bounds=False, progress=False)
    assert df["policy"].to_list() == ["lru"]
    df = sweep(
        [("t", small)], [50], ["lru"], executor="serial", bounds=["infinite"], progress=False
    )
    assert df["policy"].to_list() == ["lru", "infinite"]


def test_opt_bound_rows_bound_every_policy(small):
    pols = _policies("lru", "fifo", "lfu", "arc", "s3fifo", "slru")
    df = sweep([("t", small)], CAPS, pols, executor="serial", progress=False)
    from sim.opt import replay_opt

    opt = df.filter(pl.col("policy") == "opt")
    assert opt["capacity_blocks"].to_list() == CAPS
    assert (opt["kind"] == "bound").all()
    inf_hits = df.filter(pl.col("policy") == "infinite")["hit_blocks"][0]
    for row in opt.iter_rows(named=True):
        r = replay_opt(small, row["capacity_blocks"])
        assert row["hit_blocks"] == r.hit_blocks
        at_cap = df.filter(
            (pl.col("kind") == "policy") & (pl.col("capacity_blocks") == row["capacity_blocks"])
        )
        assert at_cap["hit_blocks"].max() <= row["hit_blocks"] <= inf_hits


def test_an_opt_import_failure_fails_the_sweep(small, monkeypatch):
    # sim.opt ships with sim: a broken import is a bug to report, never rows to drop
    monkeypatch.setitem(sys.modules, "sim.opt", None)
    with pytest.raises(SweepJobError) as info:
        sweep([("t", small)], [50], ["lru"], executor="serial", progress=False)
    assert isinstance(info.value.__cause__, ImportError)
    assert info.value.details["policy"] == "opt"


hashes = st.lists(st.integers(0, 12), min_size=0, max_size=6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(hashes, min_size=1, max_size=25),
    caps=st.lists(st.integers(1, 20), min_size=1, max_size=3),
)
def test_property_policies_never_beat_infinite_and_match_direct(reqs, caps):
    # chained ids: a request's i-th block id depends on its whole prefix
    chained, table_ids = {}, []
    for r in reqs:
        ids, prefix = [], ()
        for h in r:
            prefix = (*prefix, h)
            ids.append(chained.setdefault(prefix, len(chained)))
        table_ids.append(ids)
    t = table_from([(max(1, 4 * len(ids)), ids) for ids in table_ids])
    df = sweep([("p", t)], caps, ["lru"], executor="serial", progress=False)
    inf = df.filter(pl.col("policy") == "infinite")["hit_blocks"][0]
    for row in df.filter(pl.col("policy") == "lru").iter_rows(named=True):
        assert row["hit_blocks"] == replay_sequential(t, row["capacity_blocks"]).hit_blocks
        assert row["hit_blocks"] <= inf
    opt_rows = df.filter(pl.col("policy") == "opt")
    assert opt_rows.height == df.filter(pl.col("policy") == "lru").height
    for row in opt_rows.iter_rows(named=True):
        lru = df.filter(
            (pl.col("policy") == "lru") & (pl.col("capacity_blocks") == row["capacity_blocks"])
        )["hit_blocks"][0]
        assert lru <= row["hit_blocks"] <= inf


@pytest.mark.parametrize(
    "kwargs,err",
    [
        ({"capacities": [0]}, KVConfigError),
        ({"capacities": [-5]}, KVConfigError),
        ({"capacities": ["10"]}, KVConfigError),
        ({"capacities": [10.0]}, KVConfigError),
        ({"capacities": [True]}, KVConfigError),
        ({"capacities": []}, KVConfigError),
        ({"policies": ["no-such-policy"]}, KVConfigError),
        ({"policies": []}, KVConfigError),
        ({"executor": "threads"}, KVConfigError),
        ({"workers": 0}, KVConfigError),
        ({"bounds": ["belady"]}, KVConfigError),
    ],
)
def test_bad_arguments_raise_typed_errors(small, kwargs, err):
    args = {"capacities": [10], "policies": ["lru"], **kwargs}
    with pytest.raises(err):
        sweep([("t", small)], args.pop("capacities"), args.pop("policies"), progress=False, **args)


def test_bad_traces_raise_typed_errors(tmp_path, small):
    with pytest.raises(KVInvalidInputError, match="not found"):
        sweep([tmp_path / "missing.jsonl"], [10], ["lru"], progress=False)
    with pytest.raises(KVInvalidInputError):
        sweep([("t", {"not": "a table"})], [10], ["lru"], progress=False)
    with pytest.raises(KVInvalidInputError):
        sweep([], [10], ["lru"], progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"timestamp": 0, "input_length": 5}) + "\n")
    from sagellm_kv_cache.errors import KVTraceFormatError

    with pytest.raises(KVTraceFormatError):
        sweep([bad], [10], ["lru"], executor="serial", progress=False)


@pytest.mark.parametrize("executor", ["serial", "process"])
def test_failing_job_names_the_job(small, executor):
    broken = small.drop("input_length")  # passes the table check, fails inside the replay
    with pytest.raises(SweepJobError) as info:
        sweep(
            [("good", small), ("broken", broken)],
            [25],
            ["lru"],
            executor=executor,
            workers=2,
            bounds=False,
            progress=False,
        )
    msg = str(info.value)
    assert "'broken'" in msg and "policy 'lru'" in msg and "capacity 25" in msg
    assert info.value.code == "KV_SWEEP_JOB_FAILED"
    assert info.value.details["trace"] == "broken"
    assert info.value.__cause__ is not None


class _Ref:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class FakeRay:
    """Just enough of the ray API, in process, to test how the executor drives it."""

    def __init__(self, initialized=False):
        self.initialized = initialized
        self.calls = []

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        self.initialized = True

    def shutdown(self):
        self.calls.append(("shutdown", {}))
        self.initialized = False

    def put(self, value):
        self.calls.append(("put", {}))
        return _Ref(value)

    def remote(self, **options):
        def wrap(fn):
            class Remote:
                @staticmethod
                def remote(ref, job):
                    try:
                        return _Ref(fn(ref.value, job))
                    except Exception as err:
                        return _Ref(error=err)

            return Remote

        return wrap

    def wait(self, pending, num_returns=1):
        return pending[-num_returns:], pending[:-num_returns]  # finish out of order

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def cancel(self, ref):
        self.calls.append(("cancel", {}))


@pytest.mark.parametrize("address", [None, "ray://10.0.0.1:10001"])
def test_ray_executor_starts_puts_once_and_shuts_down_what_it_started(small, monkeypatch, address):
    import sys

    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    got = sweep(
        [("a", small), ("b", small.head(100))],
        CAPS,
        ["lru"],
        executor="ray",
        workers=3,
        progress=False,
        ray_address=address,
    )
    want = sweep(
        [("a", small), ("b", small.head(100))], CAPS, ["lru"], executor="serial", progress=False
    )
    assert _key(got) == _key(want)  # rows in job order although tasks finished in reverse
    names = [name for name, _ in fake.calls]
    assert names == ["init", "put", "put", "shutdown"]  # each table put once
    init_kwargs = fake.calls[0][1]
    if address is None:
        assert init_kwargs["num_cpus"] == 3 and init_kwargs["include_dashboard"] is False
    else:
        assert init_kwargs["address"] == address


def test_ray_executor_keeps_a_running_instance_and_names_failed_jobs(small, monkeypatch):
    import sys

    fake = FakeRay(initialized=True)
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(SweepJobError, match="'broken'"):
        sweep(
            [("broken", small.drop("input_length"))],
            [10, 20],
            ["lru"],
            executor="ray",
            bounds=False,
            progress=False,
        )
    names = [name for name, _ in fake.calls]
    assert "init" not in names and "shutdown" not in names and "cancel" in names
    fake.initialized = False
    with pytest.raises(SweepJobError):
        sweep(
            [("broken", small.drop("input_length"))],
            [10],
            ["lru"],
            executor="ray",
            bounds=False,
            progress=False,
        )
    assert fake.calls[-1][0] == "shutdown"  # a failed sweep still shuts down what it started


@pytest.mark.ray
def test_ray_executor_matches_serial_and_shuts_down(small, monkeypatch):
    ray = pytest.importorskip("ray", reason="ray is not installed (the ray extra; CI installs it)")
    assert not ray.is_initialized()  # no test leaves an instance running
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    try:
        got = sweep(
            [("t", small.head(120))], [40, 300], ["lru"], executor="ray", workers=2, progress=False
        )
        assert not ray.is_initialized()  # it shut down the instance it started
    finally:
        ray.shutdown()
    want = sweep([("t", small.head(120))], [40, 300], ["lru"], executor="serial", progress=False)
    assert _key(got) == _key(want)


def test_lru_rows_equal_the_one_pass_lru_curve(small):
    import sim.mrc as mrc

    caps = [300, 600, 3000]  # at or above the largest request (263 blocks): the curve is exact
    df = sweep([("t", small)], caps, ["lru"], executor="serial", bounds=False, progress=False)
    curve = mrc.lru_mrc(small).hit_ratios(caps)
    assert curve["exact"].all()
    assert df["hit_blocks"].to_list() == curve["hit_blocks"].to_list()
    assert df["token_hit_ratio"].to_list() == pytest.approx(curve["token_hit_ratio"].to_list())


# -- issue 12: any configuration field, timing metrics where the mode has a clock ---------------
def _concurrent_sweep(table, grid):
    """One policy (lru) at one capacity (500), concurrent, no bounds, over ``grid``."""
    from sim.sweep import sweep

    return sweep(
        [("m", table)],
        [500],
        ["lru"],
        executor="serial",
        progress=False,
        mode="concurrent",
        grid=grid,
        bounds=False,
    )


def test_sweep_grid_over_mode_and_max_num_seqs_has_timing_columns():
    from sim.sweep import sweep

    table = read_trace(DEFAULT_TRACE).head(300)
    df = _concurrent_sweep(table, {"max_num_seqs": [1, None]})
    assert df["setting"].to_list() == ["max_num_seqs=1", "max_num_seqs=None"]
    one, free = df.rows(named=True)
    assert one["ttft_p99_s"] >= free["ttft_p99_s"] and one["throughput_rps"] > 0
    seq = sweep([("m", table)], [500], ["lru"], executor="serial", progress=False, bounds=False)
    assert np.isnan(seq["ttft_p50_s"][0]) and seq["mode"][0] == "sequential"
    # zero cost: concurrent equals sequential
    zero = _concurrent_sweep(
        table, {"cost": ["prefill_s_per_token=0,prefill_overhead_s=0,decode_s_per_token=0"]}
    )
    assert zero["hit_blocks"][0] == seq["hit_blocks"][0]


def test_sweep_grid_over_engine_rows_equal_direct_runs():
    from sim.simulate import simulate

    table = read_trace(DEFAULT_TRACE).head(200)
    df = _concurrent_sweep(table, {"engine": ["request", "iteration"]})
    assert df["setting"].to_list() == ["engine=request", "engine=iteration"]
    for row, engine in zip(df.rows(named=True), ("request", "iteration"), strict=True):
        r = simulate(table, 500, "lru", mode="concurrent", engine=engine)
        s = r.summary()
        assert row["hit_blocks"] == r.hit_blocks and row["evictions"] == r.evictions
        assert row["ttft_p99_s"] == pytest.approx(s["ttft_p99_s"])
        assert row["throughput_rps"] == pytest.approx(s["throughput_rps"])
    # the engines differ: the iteration engine's requests contend for the GPU
    assert df["ttft_p99_s"][0] != df["ttft_p99_s"][1]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mode": "fleet"}, "mode must be one of"),
        ({"grid": {"frobnicate": [1]}}, "cannot sweep 'frobnicate'"),
        ({"grid": {"max_num_seqs": []}}, "has no values"),
        ({"grid": {"engine": ["steps"]}}, "engine must be one of"),
        ({"grid": {"engine": ["iteration"], "instances": [2]}}, "one instance"),
    ],
)
def test_sweep_bad_mode_or_grid_is_a_config_error(kw, match):
    from sim.sweep import sweep

    with pytest.raises(KVConfigError, match=match):
        sweep([("m", read_trace(DEFAULT_TRACE).head(5))], [10], ["lru"], executor="serial", **kw)
