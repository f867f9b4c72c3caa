"""Step cost models (sim.cost) and calibration (sim.calibrate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError
from sim.calibrate import calibrate
from sim.config import LinearCostModel
from sim.cost import (
    LinearStepCost,
    RooflineCost,
    TableCost,
    batch_stats,
    model_spec,
    parse_cost_model,
)


def test_linear_step_maps_request_level_coefficients():
    m = parse_cost_model(LinearCostModel())
    # a request alone: prefill step, then decode steps of decode_s_per_token each
    assert m.step_time([(1000, 0)]) == pytest.approx(0.010 + 6e-5 * 1000)
    assert m.step_time([(1, 1000)] * 7) == pytest.approx(0.012)
    assert m.step_time([(1000, 0), (1, 50)]) == pytest.approx(0.010 + 0.06 + 0.012)


def test_batch_stats_sums_and_typed_errors():
    st = batch_stats([(4, 0), (1, 10)])
    assert st == (5, 2, 1, 4 * 5 / 2 + 11, 15)
    for bad in ([(0, 1)], [(1.5, 0)], [(True, 0)], [(1,)], [(1, -1)]):
        with pytest.raises(KVInvalidInputError):
            batch_stats(bad)


def test_roofline_llama2_7b_prefill_on_h100():
    m = parse_cost_model("roofline:gpu=h100,model=llama-2-7b")
    assert isinstance(m, RooflineCost)
    ms = [m.prefill_s(n) * 1e3 for n in (512, 2048, 4096)]
    # compute bound: 2 x 6.48e9 params x n FLOPs at 0.7 x 989.5 TFLOP/s, plus attention
    assert ms == pytest.approx([10.27, 41.02, 85.98], rel=0.01)
    # decode at batch 1 is memory bound: 13.5 GB of weights at 0.8 x 3.35 TB/s ~ 5 ms
    assert m.step_time([(1, 1000)]) == pytest.approx(0.0056, rel=0.05)


def test_roofline_moe_and_fp8_and_hf_config(tmp_path):
    mix = parse_cost_model("roofline:gpu=h100,model=mixtral-8x7b")
    dense = parse_cost_model("roofline:gpu=h100,model=llama-3-8b")
    # one token reads 2 experts' weights; 8 tokens read all 8 (~47B parameters)
    assert mix.step_time([(1, 100)]) < 2.5 * dense.step_time([(1, 100)])
    assert mix.step_time([(1, 100)] * 8) > 4 * dense.step_time([(1, 100)] * 8)
    fp8 = parse_cost_model("roofline:gpu=h100,model=llama-3-8b,dtype=fp8")
    assert fp8.prefill_s(4096) < 0.6 * dense.prefill_s(4096)
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "vocab_size": 32000,
                "torch_dtype": "float16",
            }
        )
    )
    spec = model_spec(str(cfg))
    assert (spec.num_kv_heads, spec.head_dim, spec.dtype) == (32, 128, "float16")
    hf = RooflineCost(spec, "h100")
    assert hf.prefill_s(2048) == pytest.approx(
        parse_cost_model("roofline:gpu=h100,model=llama-2-7b").prefill_s(2048)
    )


@pytest.mark.parametrize(
    "text",
    [
        "roofline:gpu=h100",
        "roofline:gpu=tpu,model=llama-2-7b",
        "roofline:gpu=h100,model=x",
        "roofline:gpu=h100,model=llama-2-7b,eff_gemm=2",
        "magic:1",
        "linear:bogus=1",
        "table:/nope.json",
    ],
)
def test_bad_cost_specs_are_typed(text):
    with pytest.raises(KVConfigError):
        parse_cost_model(text)


def test_table_interpolates_and_extrapolates(tmp_path):
    t = TableCost([1, 11], [0, 100], [[1.0, 2.0], [3.0, 4.0]], {"gpu": "test"})
    assert t.lookup(6, 50) == pytest.approx(2.5)
    assert t.lookup(21, 0) == pytest.approx(5.0)  # linear past the edge
    p = tmp_path / "t.json"
    t.save(p)
    again = parse_cost_model(f"table:{p}")
    assert again.step_time([(6, 44)]) == pytest.approx(t.lookup(6, 50))
    assert again.provenance == {"gpu": "test"}
    with pytest.raises(KVConfigError):
        TableCost([1, 1], [0, 1], [[1, 1], [1, 1]])


def _bench(model, n=300, noise=0.02, seed=1):
    rng = np.random.default_rng(seed)
    inp = rng.integers(64, 8192, n)
    out = rng.integers(2, 64, n)
    ttfts, itls = [], []
    for x, o in zip(inp, out):
        ttfts.append(model.step_time([(int(x), 0)]) * rng.normal(1, noise))
        itls.append(
            [model.step_time([(1, int(x) + j)]) * rng.normal(1, noise) for j in range(1, int(o))]
        )
    return {"ttfts": ttfts, "itls": itls, "input_lens": inp.tolist(), "output_lens": out.tolist()}


def test_calibrate_recovers_known_factors_with_small_error(tmp_path):
    truth = LinearStepCost(
        step_overhead_s=0.0,
        prefill_overhead_s=0.004,
        prefill_s_per_token=5e-5,
        decode_step_s=0.006,
        attn_s_per_pair=2e-10,
        kv_s_per_token=3e-7,
    )
    cal = calibrate(_bench(truth))
    m = cal.model
    assert m.prefill_overhead_s == pytest.approx(0.004, abs=0.003)  # small next to 0.4 s
    assert m.prefill_s_per_token == pytest.approx(5e-5, rel=0.05)
    assert m.decode_step_s == pytest.approx(0.006, rel=0.05)
    assert m.kv_s_per_token == pytest.approx(3e-7, rel=0.15)
    assert cal.ttft_mape <= 0.05 and cal.itl_mape <= 0.05
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(_bench(truth)))
    from cli.calibrate_cmds import calibrate as cmd

    res = CliRunner().invoke(cmd, [str(p)])
    assert res.exit_code == 0, res.output
    assert "TTFT MAPE" in res.output and "--cost-model linear:" in res.output
    spec = res.output.strip().splitlines()[-1].split(" ", 1)[1]
    assert parse_cost_model(spec).decode_step_s == pytest.approx(0.006, rel=0.05)


def _table_from(model, axis):
    """A step-time table measured on ``model`` at ``axis`` x ``axis`` (one sequence per
    point: T new tokens against max(kv, T) keys, as profile_step_times.py measures)."""
    toks = [a for a in axis if a >= 1]
    secs = [[model.step_time([(tk, max(kv - tk, 0))]) for kv in axis] for tk in toks]
    return TableCost(toks, axis, secs, {"made_from": "roofline with known factors"})


def test_calibrate_recovers_roofline_factors_from_a_known_table_with_noise(tmp_path):
    known = "eff_gemm=0.55,eff_attn=0.35,eff_mem=0.65,step_overhead_s=0.002"
    truth = parse_cost_model(f"roofline:gpu=h100,model=llama-3-8b,{known}")
    # the fitter alone, on the roofline's own times: exact
    exact = calibrate(_bench(truth, noise=0.0), model="roofline:gpu=h100,model=llama-3-8b")
    assert exact.model.eff_gemm == pytest.approx(0.55, rel=1e-6)
    assert exact.model.eff_attn == pytest.approx(0.35, rel=1e-6)
    assert exact.model.eff_mem == pytest.approx(0.65, rel=1e-6)
    assert exact.model.step_overhead_s == pytest.approx(0.002, rel=1e-6)
    # timings from a table of that model (a 28 x 29 grid of powers of sqrt 2, bilinear
    # between points) with 2% noise: the factors come back, the held-out error is small
    axis = sorted({round(2 ** (k / 2)) for k in range(29)} | {0})
    bench = _bench(_table_from(truth, axis), noise=0.02)
    cal = calibrate(bench, model="roofline:gpu=h100,model=llama-3-8b")
    m = cal.model
    assert m.eff_gemm == pytest.approx(0.55, rel=0.05)
    assert m.eff_mem == pytest.approx(0.65, rel=0.05)
    assert m.step_overhead_s == pytest.approx(0.002, rel=0.15)
    # attention is ~10% of a prefill and the table's interpolation bends its quadratic
    assert m.eff_attn == pytest.approx(0.35, rel=0.15)
    assert cal.ttft_mape <= 0.05 and cal.itl_mape <= 0.05
    # the CLI prints the same fit as a spec --cost-model takes
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(bench))
    from cli.calibrate_cmds import calibrate as cmd

    res = CliRunner().invoke(cmd, [str(p), "--model", "roofline:gpu=h100,model=llama-3-8b"])
    assert res.exit_code == 0, res.output
    assert "TTFT MAPE" in res.output
    spec = res.output.strip().splitlines()[-1].split(" ", 1)[1]
    again = parse_cost_model(spec)
    assert isinstance(again, RooflineCost) and again.eff_gemm == pytest.approx(m.eff_gemm)
    bad = CliRunner().invoke(cmd, [str(p), "--model", "table:nope"])
    assert bad.exit_code == 1 and "Error: [KV_CONFIG" in bad.output


def test_calibrate_bad_input_is_typed(tmp_path):
    with pytest.raises(KVInvalidInputError):
        calibrate({"ttfts": [1.0]})
    with pytest.raises(KVConfigError):
        calibrate(_bench(LinearStepCost(), n=10), holdout=1.5)
    p = tmp_path / "x.json"
    p.write_text("{not json")
    from cli.calibrate_cmds import calibrate as cmd

    res = CliRunner().invoke(cmd, [str(p)])
    assert res.exit_code == 1 and "Error: [KV_INVALID_INPUT" in res.output


def test_profile_script_smoke_on_cpu_writes_a_table_with_provenance(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step_times.py"
    spec = importlib.util.spec_from_file_location("profile_step_times", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "t.json"
    argv = ["--device", "cpu", "--tiny", "--tokens", "1", "8", "--kv-tokens", "0", "32"]
    mod.main([*argv, "--warmup", "0", "--repeat", "1", "--out", str(out)])
    t = TableCost.load(out)
    assert t.tokens == [1.0, 8.0] and t.kv_tokens == [0.0, 32.0]
    assert t.provenance["device"] == "cpu" and t.provenance["model"]["name"] == "tiny"
    assert t.step_time([(4, 10)]) > 0


def test_bundled_h200_table_loads_by_name_with_its_provenance():
    from sim.cost.table import TableCost

    assert "h200-llama-3-8b" in TableCost.bundled()
    m = parse_cost_model("table:h200-llama-3-8b")
    assert m.provenance["gpu"] == "NVIDIA H200" and m.provenance["model"]["name"] == "llama-3-8b"
    assert m.tokens[0] == 1 and m.tokens[-1] == 8192 and m.kv_tokens[-1] == 262144
    # a decode step reads more KV as its context grows; a prefill of 8192 tokens dwarfs a decode
    assert m.step_time([(1, 262143)]) > m.step_time([(1, 1023)]) > 0
    assert m.step_time([(8192, 0)]) > 20 * m.step_time([(1, 0)])
    with pytest.raises(KVConfigError, match="no-such-table"):
        parse_cost_model("table:no-such-table")
