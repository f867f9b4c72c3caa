"""Prefill/decode disaggregation (sim.pd): hand-checked times, link specs, the CLI."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sim_iteration import small_traces, table, unit

from sagellm_kv_cache.errors import KVConfigError
from sim.cost import LinearStepCost
from sim.iteration_run import simulate_iteration
from sim.pd import LINKS, LinkModel, parse_link, parse_pd, simulate_pd
from traces import DEFAULT_TRACE, read_trace

# 2 layers x 1 KV head x 4 dims x fp16: 2 * 2 * 1 * 4 * 2 = 32 bytes per token
SHAPE = "2,1,4,fp16"
# 8 prompt tokens = 256 bytes: 0.5 s latency + 256 / 128 = 2.5 s
LINK = LinkModel("test", 128.0, 0.5)


def col(r, name):
    return r.records[name].to_list()


def cost():
    return unit(step_overhead_s=1.0, prefill_s_per_token=0.1, decode_step_s=0.5)


def test_one_request_ttft_is_prefill_plus_transfer_and_e2e_adds_decode_steps():
    c = cost()
    r = simulate_pd(table([(0, 8, 3)]), (1, 1), cost=c, link=LINK, model_shape=SHAPE)
    # prefill instance: one step of 8 tokens (1 + 0.8 = 1.8 s), its first token sampled;
    # the decode instance computes the first token's KV and samples tokens 2 and 3
    assert c.log == [8, 1, 1]
    assert r.stats["kv_bytes_per_token"] == 32
    assert col(r, "transfer_s") == [pytest.approx(2.5)]
    assert col(r, "ttft_s") == [pytest.approx(1.8 + 2.5)]
    assert col(r, "e2e_s") == [pytest.approx(4.3 + 1.5 + 1.5)]
    assert col(r, "itl_max_s") == [pytest.approx(1.5)]  # the first gap counts from the TTFT
    assert col(r, "tpot_s") == [pytest.approx(1.5)]
    assert col(r, "decode_queue_s") == [0.0]
    assert (col(r, "prefill_instance"), col(r, "decode_instance")) == ([0], [0])
    assert r.mode == "pd" and r.num_steps == 3
    inst = r.stats["instances"]
    assert [(x["role"], x["requests"], x["steps"]) for x in inst] == [
        ("prefill", 1, 1),
        ("decode", 1, 2),
    ]
    assert [x["busy_s"] for x in inst] == [pytest.approx(1.8), pytest.approx(3.0)]
    assert inst[0]["utilization"] == pytest.approx(1.8 / 7.3)


def test_two_requests_contend_for_one_prefill_instance():
    c = cost()
    t = table([(0, 8, 2), (0, 8, 2)])
    r = simulate_pd(t, "1:2", cost=c, link=LINK, model_shape=SHAPE, max_num_batched_tokens=8)
    # one prefill instance, a budget of 8: A's prompt [0, 1.8], B's [1.8, 3.6]; each KV
    # takes 2.5 s; A lands at 4.3 on decode instance 0, B at 6.1 on decode instance 1
    assert col(r, "start_s") == [0.0, pytest.approx(1.8)]
    assert col(r, "queue_s") == [0.0, pytest.approx(1.8)]
    assert col(r, "ttft_s") == [pytest.approx(4.3), pytest.approx(6.1)]
    assert col(r, "finish_s") == [pytest.approx(5.8), pytest.approx(7.6)]
    assert col(r, "decode_instance") == [0, 1]
    assert [x["requests"] for x in r.stats["instances"]] == [2, 1, 1]


def test_a_decode_pool_too_small_makes_a_request_wait():
    c = cost()
    t = table([(0, 8, 3), (0, 8, 3)])
    # each request needs ceil((8 + 3 - 1) / 4) = 3 blocks on the decode side: one at a time
    r = simulate_pd(
        t,
        (1, 1),
        cost=c,
        link=LINK,
        model_shape=SHAPE,
        max_num_batched_tokens=8,
        decode_capacity=3,
    )
    # A lands at 4.3 and decodes [4.3, 5.8], [5.8, 7.3]; B lands at 6.1 and waits for
    # A's blocks: admitted at 7.3, tokens at 8.8 and 10.3
    assert col(r, "ttft_s") == [pytest.approx(4.3), pytest.approx(6.1)]
    assert col(r, "decode_queue_s") == [0.0, pytest.approx(1.2)]
    assert col(r, "finish_s") == [pytest.approx(7.3), pytest.approx(10.3)]
    assert col(r, "itl_max_s")[1] == pytest.approx(2.7)  # 6.1 -> 8.8
    assert r.stats["instances"][1]["peak_blocks_in_use"] == 3


def test_one_token_outputs_finish_on_the_prefill_instance():
    r = simulate_pd(table([(0, 8, 1)]), (1, 1), cost=cost(), link=LINK, model_shape=SHAPE)
    assert col(r, "ttft_s") == col(r, "e2e_s") == [pytest.approx(1.8)]
    assert col(r, "decode_instance") == [-1] and math.isnan(col(r, "transfer_s")[0])


def test_zero_time_link_one_to_one_equals_colocated_when_requests_do_not_overlap():
    # requests 100 s apart never share a step: PD 1:1 over a zero-time link then times
    # every request exactly as one colocated instance does
    t = table([(100 * k, 4 + 3 * k, 2 + k) for k in range(6)])
    for c in ("roofline:gpu=h100,model=llama-3-8b", LinearStepCost()):
        a = simulate_pd(t, (1, 1), cost=c, link="none", max_num_batched_tokens=16)
        b = simulate_iteration(t, cost=c, max_num_batched_tokens=16)
        for name in ("ttft_s", "e2e_s", "itl_max_s", "tpot_s"):
            assert col(a, name) == pytest.approx(col(b, name), nan_ok=True), name


def test_zero_time_link_prefill_side_equals_a_colocated_prefill_only_run():
    # the prefill instance is exactly an iteration instance whose outputs are one token
    t = read_trace(DEFAULT_TRACE).head(200)
    kw = dict(capacity=1500, max_num_batched_tokens=4096, max_num_seqs=32)
    a = simulate_pd(t, (1, 2), link="none", **kw)
    b = simulate_iteration(t.with_columns(output_length=1), **kw)
    assert col(a, "hit_blocks") == col(b, "hit_blocks")
    assert col(a, "start_s") == col(b, "start_s")
    assert col(a, "ttft_s") == col(b, "ttft_s")  # zero transfer: TTFT is the prefill's
    # and a request's E2E is at least its TTFT plus one decode step per further token
    for ttft, e2e, out in zip(col(a, "ttft_s"), col(a, "e2e_s"), col(a, "output_length")):
        assert e2e >= ttft + 0.012 * (max(out, 1) - 1) - 1e-9


def test_link_presets_and_specs(tmp_path):
    assert parse_link("NVLink") is LINKS["nvlink"]
    assert LINKS["ib-ndr"].transfer_s(50e9) == pytest.approx(1 + 5e-6)
    assert LINKS["none"].transfer_s(1e12) == 0.0
    assert parse_link("bw=400Gb/s,lat=10us").transfer_s(50e9) == pytest.approx(1 + 1e-5)
    f = tmp_path / "bench_transfer.json"
    rows = [
        {"variant": "raw isend/irecv + ack", "gbps": 9.0},
        {"variant": "engine, checksum on", "gbps": 2.0},
        {"variant": "engine, checksum off", "gbps": 4.0},
    ]
    f.write_text(json.dumps({"rows": rows}))
    lk = parse_link(f"bench:{f},lat=1ms")  # the transfer engine's own best rate
    assert lk.bytes_per_s == 4e9 and lk.latency_s == 1e-3


@pytest.mark.parametrize(
    "bad",
    ["warp", "bw=fast", "lat=1us", "bw=1GB/s,x=1", "bench:/nonexistent.json", 7],
)
def test_bad_links_are_typed(bad):
    with pytest.raises(KVConfigError) as e:
        parse_link(bad)
    assert e.value.code == "KV_CONFIG_INVALID"


@pytest.mark.parametrize("bad", ["2-6", "0:1", (1, 0), (True, 1), None])
def test_bad_pd_counts_are_typed(bad):
    with pytest.raises(KVConfigError):
        parse_pd(bad)


def test_kv_bytes_come_from_a_model_shape_or_the_roofline_model():
    t = table([(0, 8, 2)])
    with pytest.raises(KVConfigError):
        simulate_pd(t, (1, 1), link="nvlink")  # linear cost, no model shape
    r = simulate_pd(t, (1, 1), cost="roofline:gpu=h100,model=llama-3-8b")
    assert r.stats["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2
    r = simulate_pd(t, (1, 1), model_shape="llama-3-8b", link="tcp-100g")
    assert col(r, "transfer_s") == [pytest.approx(50e-6 + 8 * 131072 / 12.5e9)]


def test_cli_replay_pd(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    t = read_trace(DEFAULT_TRACE).head(40)
    src = tmp_path / "t.jsonl"
    with src.open("w") as f:
        for row in t.iter_rows(named=True):
            rec = {"timestamp": int(row["arrival_s"] * 1000), "input_length": row["input_length"]}
            rec.update(output_length=row["output_length"], hash_ids=row["block_hashes"])
            f.write(json.dumps(rec) + "\n")
    args = ["replay", str(src), "--capacity", "2000", "--no-progress", "--pd", "1:2"]
    args += ["--link", "ib-ndr", "--model-shape", "llama-3-8b"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["mode"] == "pd" and s["num_requests"] == 40 and s["pd"] == [1, 2]
    assert [x["role"] for x in s["instances"]] == ["prefill", "decode", "decode"]
    bad = CliRunner().invoke(cli, [*args[:6], "--pd", "2-6"])
    assert bad.exit_code == 2 and "--pd" in bad.output
    bad = CliRunner().invoke(cli, [*args[:6], "--link", "carrier-pigeon"])
    assert bad.exit_code == 2 and "--link" in bad.output


@settings(max_examples=40, deadline=None)
@given(
    t=small_traces(),
    cap=st.integers(8, 40),
    mbt=st.integers(1, 24),
    seqs=st.integers(1, 6),
    counts=st.sampled_from([(1, 1), (1, 2), (2, 1)]),
)
def test_pd_lazy_instances_equal_the_plain_loop(t, cap, mbt, seqs, counts):
    kw = dict(
        capacity=cap,
        cost=LinearStepCost(step_overhead_s=0.1, prefill_s_per_token=0.01, decode_step_s=0.03),
        link=LINK,
        model_shape=SHAPE,
        max_num_batched_tokens=mbt,
        max_num_seqs=seqs,
    )
    a = simulate_pd(t, counts, **kw)
    b = simulate_pd(t, counts, reference=True, **kw)
    assert a.records.equals(b.records)
    assert a.stats["instances"] == b.stats["instances"]
