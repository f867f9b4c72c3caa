"""The iteration-level engine (sim.iteration): hand-checked step schedules and times."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError
from sim.cost import LinearStepCost
from sim.iteration_run import parse_slo, simulate_iteration
from sim.replay import replay_sequential
from traces import DEFAULT_TRACE, read_trace
from traces._common import BASE_COLUMNS


def table(rows, bs=4):
    """rows: (arrival, input, output); each request gets its own hash ids unless given."""
    recs = []
    nxt = 0
    for k, row in enumerate(rows):
        arrival, inp, out = row[:3]
        if len(row) > 3:
            hs = list(row[3])
        else:
            hs = list(range(nxt, nxt + inp // bs))
            nxt += inp // bs
        recs.append((str(k), float(arrival), inp, out, hs, bs))
    return pl.DataFrame(
        recs,
        schema=list(BASE_COLUMNS),
        orient="row",
    )


class Recording(LinearStepCost):
    """A linear model that logs each step's new tokens (fast-forwarded steps included)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        object.__setattr__(self, "log", [])

    def time(self, st):
        self.log.append(st.num_tokens)
        return super().time(st)


def unit(**kw):
    base = dict(
        prefill_overhead_s=0.0, prefill_s_per_token=0.0, decode_step_s=0.0, step_overhead_s=0.0
    )
    base.update(kw)
    return Recording(**base)


def col(r, name):
    return r.records[name].to_list()


def test_one_request_alone_chunks_and_decode_steps_sum_to_the_expected_time():
    cost = unit(step_overhead_s=1.0, prefill_s_per_token=0.1, decode_step_s=0.5)
    r = simulate_iteration(table([(0, 10, 3)]), cost=cost, max_num_batched_tokens=4)
    assert cost.log == [4, 4, 2, 1, 1]  # chunks 4+4+2 at the budget, then two decodes
    # 1.4 + 1.4 + 1.2 = 4.0 to the first token; two decode steps of 1 + 0.5
    assert col(r, "ttft_s") == [pytest.approx(4.0)]
    assert col(r, "e2e_s") == [pytest.approx(7.0)]
    assert col(r, "tpot_s") == [pytest.approx(1.5)]
    assert col(r, "itl_max_s") == [pytest.approx(1.5)]
    assert r.num_steps == 5 and r.preemptions == 0


def test_two_requests_contending_second_ttft_includes_the_shared_step():
    cost = unit(step_overhead_s=1.0, prefill_s_per_token=0.1, decode_step_s=0.5)
    r = simulate_iteration(table([(0, 4, 3), (0.5, 4, 2)]), cost=cost, max_num_batched_tokens=8)
    # step 1 [0, 1.4]: A's prefill; step 2 [1.4, 3.3]: A decodes + B's prefill (1 + 0.4 + 0.5);
    # step 3 [3.3, 4.8]: both decode
    assert cost.log == [4, 5, 2]
    assert col(r, "start_s") == [0.0, pytest.approx(1.4)]
    assert col(r, "ttft_s") == [pytest.approx(1.4), pytest.approx(3.3 - 0.5)]
    assert col(r, "queue_s")[1] == pytest.approx(0.9)
    assert col(r, "finish_s") == [pytest.approx(4.8), pytest.approx(4.8)]
    assert col(r, "itl_max_s") == [pytest.approx(1.9), pytest.approx(1.5)]


def test_preemption_when_blocks_run_out_last_admitted_recomputed():
    cost = unit(step_overhead_s=1.0)  # every step takes 1 s
    t = table([(0, 4, 6), (0, 4, 6)])
    r = simulate_iteration(t, capacity=4, cost=cost, max_num_batched_tokens=64)
    # steps 1-5 run A and B together (2 blocks each at 8 tokens); step 6 (t=5) A needs a
    # third block: B (the last admitted) is preempted, A finishes at 6; B resumes at 6
    # hitting its prompt block (its generated block was evicted for A), recomputes 5
    # tokens (4 of them computed before) and samples its sixth token at 7
    assert cost.log == [8, 2, 2, 2, 2, 1, 5]
    assert col(r, "preemptions") == [0, 1]
    assert col(r, "recomputed_tokens") == [0, 4]
    assert r.preemptions == 1 and r.recomputed_tokens == 4
    assert col(r, "finish_s") == [6.0, 7.0]
    assert col(r, "itl_max_s") == [1.0, 2.0]  # B's token 6 came 2 s after token 5
    assert col(r, "hit_blocks") == [0, 0]  # first admission only


def test_chunked_prefill_splits_at_the_budget_left_by_decodes():
    cost = unit(step_overhead_s=1.0)
    t = table([(0, 4, 4), (0.5, 12, 1)])
    r = simulate_iteration(t, cost=cost, max_num_batched_tokens=5)
    # A decodes one token a step; B's prompt gets the other 4: chunks 4, 4, 4
    assert cost.log == [4, 5, 5, 5]
    assert col(r, "ttft_s") == [1.0, pytest.approx(4.0 - 0.5)]


def test_without_chunked_prefill_a_prompt_waits_for_the_whole_budget():
    cost = unit(step_overhead_s=1.0)
    t = table([(0, 4, 3), (0.5, 8, 1), (0, 12, 1)])
    r = simulate_iteration(t, cost=cost, max_num_batched_tokens=8, chunked_prefill=False)
    # the 12-token prompt can never fit the budget: rejected; B (8 tokens) needs the whole
    # budget, so it waits until A's decodes end (steps at 0, 1, 2 -> B starts at 3)
    assert col(r, "rejected") == [False, False, True]
    assert cost.log == [4, 1, 1, 8]
    assert col(r, "start_s")[1] == 3.0


def test_freed_blocks_wait_in_one_queue_cached_or_not_as_in_vllm():
    # capacity 4, 1 s a step. A (prompt [h0, h1]) frees blocks 1 then 0; C (prompt [h5] +
    # 1 token) takes the never-used 2, 3 and frees 3 (no hash) then 2: vLLM's one free
    # queue is [1(h1), 0(h0), 3, 2(h5)], so D's one block evicts h1 (a pool that hands out
    # unhashed blocks first would take 3). E ([h0, h1, h2]) then hits h0 only: 8 tokens
    # to compute, and its two blocks are 3 (a placeholder, not an eviction) and 2 (h5).
    # vLLM 0.11.0's scheduler gives the same step tokens [8, 5, 3, 8] (compare script).
    cost = unit(step_overhead_s=1.0)
    t = table([(0, 8, 1, [0, 1]), (1, 5, 1, [5]), (2, 3, 1, []), (3, 12, 1, [0, 1, 2])])
    r = simulate_iteration(t, capacity=4, cost=cost, max_num_batched_tokens=64)
    assert cost.log == [8, 5, 3, 8]
    assert col(r, "hit_blocks") == [0, 0, 0, 1]
    assert col(r, "evicted_blocks") == [0, 0, 1, 1]
    assert r.evictions == 2
    assert col(r, "finish_s") == [1.0, 2.0, 3.0, 4.0]


def test_without_chunked_prefill_a_prompt_over_the_budget_left_is_skipped():
    # budget 8; A decodes (1 token), so B (8) does not fit the 7 left and is skipped; C (7)
    # behind it is admitted in the same step (vLLM 0.11's skipped_waiting_requests), then D
    # and E next step; B runs once A has finished (vLLM gives the same steps)
    cost = unit(step_overhead_s=1.0)
    t = table([(0, 4, 3), (1, 8, 1), (1, 7, 1), (1, 2, 1), (1, 1, 1)])
    r = simulate_iteration(t, cost=cost, max_num_batched_tokens=8, chunked_prefill=False)
    assert cost.log == [4, 8, 4, 8]
    assert col(r, "first_token_s") == [1.0, 4.0, 2.0, 3.0, 3.0]
    assert col(r, "finish_s") == [3.0, 4.0, 2.0, 3.0, 3.0]


def test_without_chunked_prefill_skipped_requests_go_back_last_skipped_first():
    # B and C (8 tokens each) are skipped while A decodes at steps 1, 2 and 3; each time
    # vLLM puts them back at the head with the last skipped first, so the order flips
    # three times and C runs before B (vLLM 0.11.0: C finishes at 5, B at 6)
    cost = unit(step_overhead_s=1.0)
    t = table([(0, 4, 4), (1, 8, 1), (1, 8, 1)])
    r = simulate_iteration(t, cost=cost, max_num_batched_tokens=8, chunked_prefill=False)
    assert cost.log == [4, 1, 1, 1, 8, 8]
    assert col(r, "finish_s") == [4.0, 6.0, 5.0]


def test_zero_cost_one_at_a_time_equals_sequential_replay_request_for_request():
    t = read_trace(DEFAULT_TRACE).head(400)
    bs = int(t["block_size"][0])
    seq = replay_sequential(t, None, "lru")
    it = simulate_iteration(t, None, cost=LinearStepCost.zero(), max_num_seqs=1)
    lengths = col(seq, "input_length")
    # the last-token rule caps a hit at (input - 1) // block_size blocks
    expect = [min(h, (x - 1) // bs) for h, x in zip(col(seq, "hit_blocks"), lengths)]
    assert col(it, "hit_blocks") == expect
    assert col(it, "full_blocks") == col(seq, "full_blocks")
    assert col(it, "rejected") == col(seq, "rejected")
    assert set(col(it, "queue_s")) == {0.0} and set(col(it, "ttft_s")) == {0.0}


def _same_run(t, **kw):
    a = simulate_iteration(t, **kw)
    b = simulate_iteration(t, reference=True, **kw)
    assert a.records.equals(b.records), kw  # exact: NaN equals NaN, no tolerance
    assert (a.num_steps, a.preemptions) == (b.num_steps, b.preemptions)
    assert a.timeline.equals(b.timeline)
    return a


def test_lazy_engine_equals_the_plain_loop_on_the_bundled_trace():
    t = read_trace(DEFAULT_TRACE).head(300)
    kw = dict(capacity=400, max_num_batched_tokens=2048, max_num_seqs=16)
    r = _same_run(t, cost="roofline:gpu=h100,model=llama-3-8b", **kw)
    assert r.preemptions > 0  # preemption and chunking in play
    _same_run(t, capacity=3000, chunked_prefill=False, max_num_batched_tokens=200_000)


@st.composite
def small_traces(draw):
    n = draw(st.integers(1, 12))
    rows = []
    for _ in range(n):
        arrival = draw(st.integers(0, 20)) / 4
        inp = draw(st.integers(1, 30))
        out = draw(st.integers(0, 25))
        shared = draw(st.integers(0, inp // 4))  # a prefix shared with every request
        own = draw(st.integers(100, 10_000))
        hs = list(range(shared)) + [own * 100 + k for k in range(inp // 4 - shared)]
        rows.append((arrival, inp, out, hs))
    return table(rows)


@settings(max_examples=80, deadline=None)
@given(
    t=small_traces(),
    cap=st.integers(3, 40),
    mbt=st.integers(1, 6) | st.integers(7, 40),  # a budget under max_num_seqs cuts decodes
    seqs=st.integers(1, 8),
    chunked=st.booleans(),
    policy=st.sampled_from(["lru", "fifo", "lfu"]),
    cost=st.sampled_from(
        [
            LinearStepCost(step_overhead_s=0.1, prefill_s_per_token=0.01, decode_step_s=0.03),
            LinearStepCost(step_overhead_s=0.1, decode_s_per_seq=0.007, kv_s_per_token=1e-4),
            LinearStepCost.zero(),
        ]
    ),
)
def test_lazy_engine_equals_the_plain_loop_request_for_request(
    t, cap, mbt, seqs, chunked, policy, cost
):
    _same_run(
        t,
        capacity=cap,
        policy=policy,
        cost=cost,
        max_num_batched_tokens=mbt,
        max_num_seqs=seqs,
        chunked_prefill=chunked,
    )


def test_summary_has_serving_metrics_and_goodput():
    cost = unit(step_overhead_s=1.0)
    r = simulate_iteration(table([(0, 4, 3), (0, 4, 1)]), cost=cost, slo="ttft=1s,tpot=500ms")
    s = r.summary()
    for k in ("ttft_p99_s", "tpot_p50_s", "itl_max_p99_s", "e2e_p90_s", "input_tokens_per_s"):
        assert k in s
    # both have TTFT 1 s; A's TPOT is 1 s > 0.5 s, B has one token (no TPOT): 1 of 2 meet
    assert s["slo_attainment"] == 0.5
    assert s["goodput_rps"] == pytest.approx(1 / 3.0)
    assert s["input_tokens_per_s"] == pytest.approx(8 / 3.0)


@pytest.mark.parametrize(
    "kw",
    [
        {"max_num_seqs": 0},
        {"max_num_batched_tokens": True},
        {"chunked_prefill": "yes"},
        {"slo": "ttft=fast"},
        {"cost": "roofline:gpu=h999,model=llama-2-7b"},
    ],
)
def test_bad_settings_are_typed_errors(kw):
    with pytest.raises(KVConfigError) as e:
        simulate_iteration(table([(0, 4, 1)]), **kw)
    assert e.value.code == "KV_CONFIG_INVALID"


def test_missing_column_is_typed():
    with pytest.raises(KVInvalidInputError):
        simulate_iteration(table([(0, 4, 1)]).drop("block_hashes"))


def test_parse_slo_units():
    assert parse_slo("ttft=2s,tpot=50ms,e2e=3") == {"ttft": 2.0, "tpot": 0.05, "e2e": 3.0}


def test_simulate_engine_iteration_is_the_same_run():
    from sim.simulate import simulate

    t = table([(0, 4, 3), (0.5, 4, 2)])
    cost = LinearStepCost(step_overhead_s=1.0, prefill_s_per_token=0.1, decode_step_s=0.5)
    a = simulate(t, engine="iteration", cost=cost, iteration={"max_num_batched_tokens": 8})
    b = simulate_iteration(t, cost=cost, max_num_batched_tokens=8)
    assert a.records.equals(b.records) and a.mode == "iteration"
    with pytest.raises(KVConfigError):
        simulate(t, engine="steps")


def test_cli_replay_engine_iteration(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    t = read_trace(DEFAULT_TRACE).head(60)
    src = tmp_path / "t.jsonl"
    import json as _json

    with src.open("w") as f:
        for row in t.iter_rows(named=True):
            rec = {"timestamp": int(row["arrival_s"] * 1000), "input_length": row["input_length"]}
            rec.update(output_length=row["output_length"], hash_ids=row["block_hashes"])
            f.write(_json.dumps(rec) + "\n")
    out = tmp_path / "out"
    args = ["replay", str(src), "--engine", "iteration", "--capacity", "2000", "--no-progress"]
    args += ["--cost-model", "roofline:gpu=h100,model=llama-3-8b", "--slo", "ttft=2s,tpot=50ms"]
    res = CliRunner().invoke(cli, [*args, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    s = _json.loads(res.output)
    assert s["mode"] == "iteration" and s["num_requests"] == 60 and "goodput_rps" in s
    assert (out / "latency_cdf.png").exists()
    bad = CliRunner().invoke(cli, [*args[:-4], "--cost-model", "roofline:gpu=nope,model=x"])
    assert bad.exit_code == 2 and "--cost-model" in bad.output
    bad = CliRunner().invoke(cli, [*args, "--slo", "ttft=soon", "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "--slo" in bad.output
