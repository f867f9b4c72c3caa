"""Concurrent replay on a simulated clock: exact hits, queueing, rejection, times; equals sequential."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError, KVNoVictimError
from sagellm_kv_cache.eviction import POLICIES, LRUPolicy, list_policies
from sim.config import LinearCostModel, ReplayConfig, parse_capacity
from sim.engine import ConcurrentResult, plot_queue_ttft, replay_concurrent
from sim.replay import replay_sequential

BS = 4  # tokens per block in the hand-made traces

# prefill: 1 s + 0.25 s per uncached token; decode: 1 s per output token (exact binary fractions)
COST = LinearCostModel(
    prefill_s_per_token=0.25, prefill_overhead_s=1.0, decode_s_per_token=1.0, decode_overhead_s=0
)
FLAT = LinearCostModel(0.0, 1.0, 1.0, 0.0)  # prefill 1 s whatever the hits; decode 1 s/token


def make_table(rows, block_size: int = BS) -> pl.DataFrame:
    """Canonical trace table from ``(arrival_s, input_length, output_length, hashes)`` rows."""
    return pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(len(rows))],
            "arrival_s": [float(r[0]) for r in rows],
            "input_length": [r[1] for r in rows],
            "output_length": [r[2] for r in rows],
            "block_hashes": pl.Series([list(r[3]) for r in rows], dtype=pl.List(pl.Int64)),
            "block_size": [block_size] * len(rows),
        },
        schema_overrides={"input_length": pl.Int64, "output_length": pl.Int64},
    )


def run(rows, **kw) -> ConcurrentResult:
    kw.setdefault("progress", False)
    return replay_concurrent(make_table(rows), **kw)


def col(r: ConcurrentResult, name: str) -> list:
    return r.records[name].to_list()


def test_hits_times_and_prefill_visibility():
    # r0: blocks 1,2 prefilled 0 -> 3 (1 + 8 x 0.25), decode 2 -> finish 5
    # r1: arrives at 1 while r0 still prefills: no hit (not written yet); 12 tokens -> 4 s
    # r2: arrives at 10, everything cached: hits 1,2,3; 2 uncached tail tokens -> 1.5 s
    r = run(
        [(0, 8, 2, [1, 2]), (1, 12, 1, [1, 2, 3]), (10, 14, 0, [1, 2, 3, 4])],
        capacity=100,
        cost=COST,
    )
    assert col(r, "hit_blocks") == [0, 0, 3]
    assert col(r, "full_blocks") == [2, 3, 3]
    assert col(r, "allocated_blocks") == [2, 3, 0]
    assert col(r, "start_s") == [0.0, 1.0, 10.0]
    assert col(r, "queue_s") == [0.0, 0.0, 0.0]
    assert col(r, "prefill_end_s") == [3.0, 5.0, 11.5]
    assert col(r, "ttft_s") == [3.0, 4.0, 1.5]
    assert col(r, "finish_s") == [5.0, 6.0, 11.5]
    assert r.hit_blocks == 3 and r.full_blocks == 8
    assert r.token_hit_ratio == 3 * BS / (8 + 12 + 14)
    assert r.block_hit_ratio == 3 / 8
    assert r.request_hit_ratio == 1 / 3
    assert r.peak_running == 2 and r.peak_blocks_in_use == 5  # r1's copies of 1, 2 count
    assert r.makespan_s == 11.5
    assert (r.ttft_mean_s, r.ttft_p50_s, r.ttft_max_s) == (8.5 / 3, 3.0, 4.0)


def test_hit_on_a_prefix_cached_at_prefill_end_of_a_running_request():
    # r0 prefills 0 -> 1 and decodes until 11; r1 arrives at 2 and hits r0's blocks in use
    r = run([(0, 8, 10, [1, 2]), (2, 8, 1, [1, 2])], capacity=100, cost=FLAT)
    assert col(r, "hit_blocks") == [0, 2]
    assert r.peak_blocks_in_use == 2 and r.peak_running == 2


def test_fifo_queueing_waits_for_a_release_and_lru_evicts_tail_first():
    # capacity 4; r0 holds 3 blocks until 1 + 4 = 5. r1 needs 2 blocks, 1 is free: waits.
    # r2 needs 1 (it would fit) but waits behind r1 (strict FIFO).
    # At 5 r0 releases tail-first (hashes 3, 2, 1 become evictable in that order): r1 takes
    # the free block and evicts hash 3, r2 evicts hash 2. r3 later hits only hash 1 and
    # evicts r1's blocks (tail-first: hash 8, then 7).
    rows = [
        (0, 12, 4, [1, 2, 3]),
        (1, 8, 1, [7, 8]),
        (2, 4, 1, [9]),
        (100, 12, 0, [1, 2, 3]),
    ]
    r = run(rows, capacity=4, cost=FLAT)
    assert col(r, "start_s") == [0.0, 5.0, 5.0, 100.0]
    assert col(r, "queue_s") == [0.0, 4.0, 3.0, 0.0]
    assert col(r, "finish_s") == [5.0, 7.0, 7.0, 101.0]
    assert col(r, "ttft_s") == [1.0, 5.0, 4.0, 1.0]
    assert col(r, "evicted_blocks") == [0, 1, 1, 2]
    assert col(r, "hit_blocks") == [0, 0, 0, 1]
    assert r.peak_waiting == 2 and r.peak_blocks_in_use == 3
    assert (r.queue_mean_s, r.queue_p50_s, r.queue_max_s) == (7 / 4, 1.5, 4.0)
    assert r.num_rejected == 0 and r.evictions == 4
    tl = r.timeline
    assert tl["waiting"].max() == 2 and tl["blocks_in_use"].max() == 3
    assert tl["time_s"].to_list() == sorted(tl["time_s"].to_list())


def test_a_queued_request_starts_when_a_prefill_makes_its_blocks_hittable():
    # capacity 3; r0 holds [1,2] decoding until 11. r1 = [1,2,5] arrives at 0.5, during r0's
    # prefill: it needs 3 blocks and 1 is free, so it waits; at 1 r0's blocks are cached, r1
    # hits them (in use, so they cost no capacity) and needs 1 block: it starts.
    rows = [(0, 8, 10, [1, 2]), (0.5, 12, 1, [1, 2, 5])]
    r = run(rows, capacity=3, cost=FLAT)
    assert col(r, "start_s") == [0.0, 1.0]  # at 0.5 it needs 3 blocks, only 1 free
    assert col(r, "hit_blocks") == [0, 2]
    assert col(r, "queue_s") == [0.0, 0.5]


def test_max_num_seqs_limits_running_requests():
    rows = [(0, 4, 2, [1]), (0, 4, 2, [2]), (0, 4, 2, [3])]
    r = run(rows, capacity=100, cost=FLAT, max_num_seqs=2)
    assert col(r, "start_s") == [0.0, 0.0, 3.0]
    assert col(r, "finish_s") == [3.0, 3.0, 6.0]
    assert r.peak_running == 2
    free = run(rows, capacity=100, cost=FLAT)
    assert col(free, "start_s") == [0.0, 0.0, 0.0] and free.peak_running == 3


def test_oversize_request_is_rejected_and_never_blocks_the_queue():
    rows = [(0, 8, 1, [1, 2]), (0, 12, 1, [5, 6, 7]), (0, 4, 1, [9]), (0, 2, 1, [4])]
    r = run(rows, capacity=2, cost=FLAT)
    assert col(r, "rejected") == [False, True, False, False]
    assert r.num_rejected == 1
    assert col(r, "full_blocks") == [2, 3, 1, 0]  # a rejected request counts as a miss
    assert r.full_blocks == 6 and r.hit_blocks == 0
    assert math.isnan(col(r, "start_s")[1]) and math.isnan(col(r, "ttft_s")[1])
    assert col(r, "start_s")[2] == 2.0  # waited for r0 (capacity 2), not for r1
    assert col(r, "start_s")[3] == 2.0  # needs no block, but FIFO: waits behind r2
    assert r.makespan_s == 4.0


def test_zero_cost_equal_arrivals_run_one_at_a_time():
    # finishes, then prefill ends, then arrivals at equal times: no overlap at all
    rows = [(0, 8, 3, [1, 2]), (0, 8, 3, [1, 2]), (0, 12, 3, [1, 2, 3])]
    r = run(rows, capacity=3, cost=LinearCostModel.zero())
    assert r.peak_running == 1 and col(r, "hit_blocks") == [0, 2, 2]
    seq = replay_sequential(make_table(rows), 3)
    assert list(seq.records["hit_blocks"]) == [0, 2, 2]


def test_pool_runs_on_the_simulated_clock(monkeypatch):
    seen: list[tuple[int, float]] = []

    class Probe(LRUPolicy):
        name = "probe_clock"

        def add_many(self, block_ids) -> None:
            block_ids = list(block_ids)
            seen.extend((b, self.clock()) for b in block_ids)
            super().add_many(block_ids)

    monkeypatch.setitem(POLICIES, "probe_clock", Probe)
    r = run([(0, 8, 2, [1, 2]), (7, 4, 0, [3])], capacity=10, cost=FLAT, policy="probe_clock")
    assert r.policy == "probe_clock"
    assert seen == [(1, 3.0), (0, 3.0), (2, 8.0)]  # released tail-first at each finish


class _NoVictimsBefore10(LRUPolicy):
    """LRU that cannot name victims before simulated time 10 (a structural constraint)."""

    name = "no_victims_before_10"

    def pop_victims(self, n: int) -> list[int]:
        if self.clock() < 10:
            raise KVNoVictimError("no victim yet")
        return super().pop_victims(n)


def test_a_policy_without_victims_makes_the_head_wait_and_gives_its_hits_back(monkeypatch):
    monkeypatch.setitem(POLICIES, _NoVictimsBefore10.name, _NoVictimsBefore10)
    # r0, r1 leave hashes 1 and 7 evictable (capacity 2, nothing free); r2 runs blockless until
    # 21. r3 = [1, 5] at 2 hits 1 and must evict: the policy refuses, r3 gives its hit back and
    # waits; at 21 it takes hash 1 again and evicts hash 7.
    rows = [(0, 4, 0, [1]), (0.5, 4, 0, [7]), (0, 2, 20, [3]), (2, 8, 0, [1, 5])]
    r = run(rows, capacity=2, cost=FLAT, policy=_NoVictimsBefore10.name)
    assert col(r, "start_s") == [0.0, 0.5, 0.0, 21.0]
    assert col(r, "hit_blocks") == [0, 0, 0, 1] and col(r, "evicted_blocks") == [0, 0, 0, 1]
    with pytest.raises(KVNoVictimError):  # nobody running: waiting would never end
        run([rows[0], rows[1], rows[3]], capacity=2, cost=FLAT, policy=_NoVictimsBefore10.name)


@pytest.mark.parametrize("policy", sorted(list_policies()))
def test_every_registered_policy_equals_sequential_at_zero_cost(mooncake, policy):
    head = mooncake.head(800)
    seq = replay_sequential(head, 300, policy)
    con = replay_concurrent(
        head, capacity=300, policy=policy, cost=LinearCostModel.zero(), progress=False
    )
    assert np.array_equal(seq.records["hit_blocks"], con.records["hit_blocks"].to_numpy())
    assert seq.evictions == con.evictions
    busy = replay_concurrent(head, capacity=300, policy=policy, progress=False)
    assert busy.num_rejected == con.num_rejected and busy.peak_blocks_in_use <= 300


def test_infinite_capacity_never_evicts_or_queues():
    rows = [(0, 12, 5, [1, 2, 3]), (0.5, 12, 5, [1, 2, 3]), (0.5, 16, 5, [1, 2, 3, 4])]
    r = run(rows, capacity="inf", cost=FLAT)
    assert r.capacity_blocks == 3 + 3 + 4 and r.evictions == 0
    assert r.queue_max_s == 0.0 and col(r, "hit_blocks") == [0, 0, 0]


@pytest.mark.parametrize("capacity", [1000, 10_000, None])
def test_zero_cost_equals_sequential_on_mooncake(mooncake, capacity):
    seq = replay_sequential(mooncake, capacity)
    con = replay_concurrent(
        mooncake, capacity=capacity, cost=LinearCostModel.zero(), progress=False
    )
    for name in ("hit_blocks", "full_blocks", "evicted_blocks"):
        assert np.array_equal(seq.records[name], con.records[name].to_numpy()), name
    for name in ("token_hit_ratio", "block_hit_ratio", "request_hit_ratio", "evictions"):
        assert getattr(seq, name) == getattr(con, name), name
    assert con.num_rejected == 0 and con.peak_running == 1 and con.queue_max_s == 0.0


def test_one_seq_at_a_time_with_real_costs_equals_sequential(mooncake):
    seq = replay_sequential(mooncake, 3000)
    con = replay_concurrent(mooncake, capacity=3000, max_num_seqs=1, progress=False)
    assert np.array_equal(seq.records["hit_blocks"], con.records["hit_blocks"].to_numpy())
    assert seq.evictions == con.evictions
    assert con.queue_max_s > 0  # the trace's arrivals overlap: one at a time means queueing


def test_concurrency_on_mooncake_only_lowers_hits(mooncake):
    con = replay_concurrent(mooncake, capacity=10_000, progress=False)
    seq = replay_sequential(mooncake, 10_000)
    assert con.num_requests == 3993 and con.num_rejected == 0
    assert 0 < con.hit_blocks <= seq.hit_blocks
    assert con.peak_blocks_in_use <= 10_000 and con.peak_running > 1
    assert con.records.height == 3993
    s = con.summary()
    assert "records" not in s and s["cost"]["decode_s_per_token"] == 0.012


@pytest.fixture(scope="module")
def mooncake():
    from traces import DEFAULT_TRACE, read_trace

    return read_trace(DEFAULT_TRACE)


_row = st.tuples(
    st.integers(0, 3),  # arrival gap
    st.integers(1, 5 * BS),  # input tokens
    st.integers(0, 4),  # output tokens
    st.integers(0, 3),  # prefix family
)


def _rows(spec):
    t = 0.0
    rows = []
    for gap, n_in, n_out, fam in spec:
        t += gap
        nblocks = -(-n_in // BS)
        rows.append((t, n_in, n_out, [fam * 100 + k for k in range(nblocks)]))
    return rows


@settings(max_examples=60, deadline=None)
@given(
    spec=st.lists(_row, min_size=1, max_size=25),
    capacity=st.integers(1, 8),
    max_num_seqs=st.one_of(st.none(), st.integers(1, 3)),
    per_token=st.sampled_from([0.0, 0.25, 0.5]),
)
def test_properties_of_random_traces(spec, capacity, max_num_seqs, per_token):
    rows = _rows(spec)
    cost = LinearCostModel(per_token, 0.5, per_token, 0.25)
    r = run(rows, capacity=capacity, cost=cost, max_num_seqs=max_num_seqs)
    rec = r.records
    ran = rec.filter(~pl.col("rejected"))
    assert (ran["hit_blocks"] <= ran["full_blocks"]).all()
    assert (ran["queue_s"] >= 0).all() and (ran["prefill_end_s"] >= ran["start_s"]).all()
    assert (ran["finish_s"] >= ran["prefill_end_s"]).all()
    starts = ran["start_s"].to_list()
    assert starts == sorted(starts)  # FIFO admission
    assert r.peak_blocks_in_use <= capacity
    assert r.num_rejected == sum(n_in // BS > capacity for _, n_in, _, _ in rows)
    if max_num_seqs is not None:
        assert r.peak_running <= max_num_seqs
    zero = run(rows, capacity=capacity, cost=LinearCostModel.zero(), max_num_seqs=max_num_seqs)
    seq = replay_sequential(make_table(rows), capacity)
    assert list(seq.records["hit_blocks"]) == zero.records["hit_blocks"].to_list()
    assert seq.evictions == zero.evictions


def test_config_object_and_overrides():
    cfg = ReplayConfig(
        capacity="16t", cost="prefill_s_per_token=0.0625,prefill_overhead_s=1,decode_s_per_token=1"
    )
    r = replay_concurrent(make_table([(0, 8, 2, [1, 2])]), cfg, progress=False)
    assert r.capacity_blocks == 4 and col(r, "finish_s") == [1.0 + 0.5 + 2.0]
    r2 = replay_concurrent(make_table([(0, 8, 2, [1, 2])]), cfg, cost_model=FLAT, progress=False)
    assert col(r2, "finish_s") == [3.0]


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"policy": "nope"}, "unknown eviction policy"),
        ({"capacity": "2t"}, "holds no full block"),
        ({"capacity": "1GiB"}, "model shape"),
        ({"capacity": "lots"}, "cannot parse capacity"),
        ({"block_size": 16}, "differs from the table's 4"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"cost": "prefill=1"}, "bad cost model item"),
        ({"frobnicate": 1}, "unknown replay setting"),
    ],
)
def test_bad_settings_raise_config_errors(kw, match):
    with pytest.raises(KVConfigError, match=match):
        run([(0, 8, 1, [1, 2])], **kw)


def test_missing_column_is_invalid_input():
    with pytest.raises(KVInvalidInputError, match="block_hashes"):
        replay_concurrent(make_table([(0, 8, 1, [1, 2])]).drop("block_hashes"), progress=False)


def test_empty_table():
    r = run([], capacity=10)
    assert r.num_requests == 0 and r.records.height == 0 and r.makespan_s == 0.0


def test_byte_capacity_uses_the_model_shape():
    # llama-3-8b: 128 KiB per token, 512 KiB per 4-token block
    r = run([(0, 8, 1, [1, 2])], capacity="2MiB", model_shape="llama-3-8b")
    assert r.capacity_blocks == 4


@pytest.mark.parametrize(
    "text,amount,unit",
    [
        ("10000", 10000, "blocks"),
        ("10000b", 10000, "blocks"),
        ("5.12Mt", 5_120_000, "tokens"),
        ("tokens:512k", 512_000, "tokens"),
        ("40GiB", 40 * 2**30, "bytes"),
        ("512MB", 512e6, "bytes"),
        ("inf", math.inf, "inf"),
    ],
)
def test_capacity_strings_round_trip(text, amount, unit):
    cap = parse_capacity(text)
    assert (cap.amount, cap.unit) == (amount, unit)
    assert parse_capacity(str(cap)) == cap


def test_capacity_to_blocks():
    assert parse_capacity("5.12Mt").to_blocks(512) == 10_000
    assert parse_capacity("40GiB").to_blocks(512, "llama-3-8b") == 640
    assert parse_capacity("inf").to_blocks(512) is None


def test_plot_queue_ttft_draws_both_panels():
    r = run([(0, 12, 4, [1, 2, 3]), (1, 8, 1, [7, 8])], capacity=4, cost=FLAT)
    fig = plot_queue_ttft(r.records, r.timeline, r.capacity_blocks)
    assert len(fig.axes) == 3  # two panels plus the blocks-in-use twin axis
    import matplotlib.pyplot as plt

    plt.close(fig)
