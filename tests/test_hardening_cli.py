"""Ordinary CLI mistakes end in one line naming the option (or file:line), never a
traceback, and nothing large is allocated or replayed first (issue 11, defect 14)."""

from __future__ import annotations

import gzip
import json

import pytest
from click.testing import CliRunner

from cli.main import cli

# 512-token blocks; distinct ids 1, 2, 3, 4, 9 (five), full blocks 2 + 3 + 1 + 3 = 9
TINY = [
    {"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]},
    {"timestamp": 1000, "input_length": 1600, "output_length": 10, "hash_ids": [1, 2, 3, 4]},
    {"timestamp": 2000, "input_length": 512, "output_length": 1, "hash_ids": [9]},
    {"timestamp": 3000, "input_length": 1536, "output_length": 1, "hash_ids": [1, 2, 3]},
]


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in TINY))
    return p


def run(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def replay(*args):
    return run("replay", *args, "--no-progress", "--curve", "1,2")


def assert_one_line_error(res, *words: str, usage: bool | None = None) -> str:
    """Exit != 0 through SystemExit, no traceback, exactly one ``Error:`` line holding
    ``words``, and nothing else but click's usage block."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "Aborted!" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("note:")]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1, res.output
    others = [ln for ln in lines if not ln.startswith("Error:")]
    assert all(ln.startswith(("Usage:", "Try ")) for ln in others), res.output
    if usage is not None:
        assert bool(others) == usage, res.output
    for w in words:
        assert w in errors[0], res.output
    return errors[0]


# -- capacities --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("-5", ["--capacity", "must be positive", "'-5'"]),
        ("1.5", ["--capacity", "whole number of blocks", "'1.5'"]),
        ("0", ["--capacity", "must be positive"]),
        ("1e400", ["--capacity", "too large"]),
    ],
)
def test_bad_capacity_names_the_option(tiny, tmp_path, value, words):
    res = replay(tiny, "--capacity", value, "--out", tmp_path / "o")
    assert_one_line_error(res, *words, usage=True)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_huge_capacity_is_clamped_to_what_the_trace_can_use(tiny, tmp_path, mode):
    res = replay(tiny, "--capacity", "1e12", "--mode", mode, "--out", tmp_path / "big")
    assert res.exit_code == 0, res.output
    assert "note: --capacity 1e12" in res.output
    inf = replay(tiny, "--capacity", "inf", "--mode", mode, "--out", tmp_path / "inf")
    assert inf.exit_code == 0, inf.output
    big = json.loads((tmp_path / "big" / "summary.json").read_text())
    ref = json.loads((tmp_path / "inf" / "summary.json").read_text())
    config = json.loads((tmp_path / "big" / "config.json").read_text())
    expected = 5 if mode == "sequential" else 9  # distinct ids / all full blocks
    assert config["capacity_blocks"] == big["capacity_blocks"] == expected
    assert config["capacity_clamped_from_blocks"] == 10**12
    for key in ("token_hit_ratio", "block_hit_ratio", "request_hit_ratio", "evictions"):
        assert big[key] == ref[key], key


def test_sweep_huge_capacity_is_clamped(tiny, tmp_path):
    out = tmp_path / "sw"
    res = run(
        "sweep", tiny, "--capacities", "1e12,2", "--executor", "serial", "--no-bounds",
        "--no-progress", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["capacities_blocks"] == [2, 5]
    assert config["capacities_requested_blocks"] == [10**12, 2]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("-5", ["--capacities", "must be positive"]),
        ("1.5", ["--capacities", "whole number"]),
    ],
)
def test_sweep_bad_capacities(tiny, tmp_path, value, words):
    res = run("sweep", tiny, "--capacities", value, "--out", tmp_path / "o")
    assert_one_line_error(res, *words, usage=True)


# -- --tiers -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("foo=100", ["--tiers", "unknown tier 'foo'", "valid: gpu"]),
        ("gpu=100,foo=100", ["--tiers", "unknown tier 'foo'", "cpu", "disk"]),
        ("gpu=0", ["--tiers", "tier 'gpu'", "must be positive"]),
        ("gpu=100,cpu=0", ["--tiers", "tier 'cpu'", "must be positive"]),
        ("gpu=1.5", ["--tiers", "tier 'gpu'", "whole number"]),
        ("gpu=100,cpu=5,cpu=6", ["--tiers", "twice"]),
        ("gpu", ["--tiers", "NAME=CAPACITY"]),
        ("gpu=10GiB", ["--tiers", "model shape"]),
    ],
)
def test_bad_tiers_name_the_option_and_tier(tiny, tmp_path, value, words):
    res = replay(tiny, "--tiers", value, "--out", tmp_path / "o")
    assert_one_line_error(res, *words, usage=True)


def test_huge_tiers_are_clamped(tiny, tmp_path):
    res = replay(
        tiny, "--tiers", "gpu=1e12,cpu=1e15", "--model-shape", "llama-3-8b", "--out", tmp_path / "t"
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["tiers"] == {"gpu": 9, "cpu": 9}


# -- --out, empty and broken traces --------------------------------------------------------------
def test_unwritable_out_is_reported_before_reading_the_trace(tiny, tmp_path, monkeypatch):
    import traces

    def must_not_read(*a, **k):
        raise AssertionError("the trace was read before --out was checked")

    monkeypatch.setattr(traces, "read_trace", must_not_read)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for cmd in (["replay", tiny, "--no-progress"], ["sweep", tiny, "--no-progress"]):
        res = run(*cmd, "--out", blocker / "sub")
        assert_one_line_error(res, "--out", "not a folder", usage=True)
    res = run("replay", tiny, "--tiers", "gpu=4", "--out", blocker)
    assert_one_line_error(res, "--out", usage=True)


@pytest.mark.parametrize(
    ("name", "text"), [("e.jsonl", ""), ("e.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n")]
)
def test_empty_trace_is_an_error(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    for args in (["replay"], ["replay", "--tiers", "gpu=10"], ["sweep", "--executor", "serial"]):
        res = run(*args, p, "--no-progress", "--out", tmp_path / "o")
        assert_one_line_error(res, name, "no requests", usage=False)


def test_trace_with_only_bad_records_is_an_error(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0}\n{"timestamp": 1}\n')
    res = replay(p, "--skip-bad", "--out", tmp_path / "o")
    assert_one_line_error(res, "bad.jsonl", "2 malformed records skipped")


def test_truncated_gzip_trace_names_file_and_line(tmp_path):
    raw = gzip.compress(
        "".join(json.dumps({**TINY[0], "timestamp": i}) + "\n" for i in range(3000)).encode()
    )
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(raw[: len(raw) // 2])
    for args in (["replay"], ["sweep", "--executor", "serial"]):
        res = run(*args, p, "--no-progress", "--out", tmp_path / "o")
        assert_one_line_error(res, "t.jsonl.gz:", "field '<gzip>'", "truncated")


def test_garbage_gzip_trace_is_not_aborted(tmp_path):
    p = tmp_path / "g.jsonl.gz"
    p.write_bytes(b"not gzip\n" * 5)
    res = replay(p, "--out", tmp_path / "o")
    assert_one_line_error(res, "g.jsonl.gz:1:", "<gzip>")


def test_bad_record_names_file_line_and_field(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(
        json.dumps(TINY[0]) + "\n" + json.dumps({**TINY[1], "output_length": 2**64}) + "\n"
    )
    res = replay(p, "--out", tmp_path / "o")
    assert_one_line_error(res, "m.jsonl:2:", "output_length")


# -- the net under every command ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "words"),
    [
        ("kv", ["[KV_CONFIG_INVALID]", "broken on purpose"]),
        ("eof", ["unexpected end of input"]),
        ("memory", ["out of memory"]),
    ],
)
def test_errors_escaping_a_command_become_one_line(tmp_path, monkeypatch, exc, words):
    from sagellm_kv_cache.errors import KVConfigError
    from sim import demo_workload as demo

    def boom(*a, **k):
        raise {
            "kv": KVConfigError("broken on purpose"),
            "eof": EOFError(),
            "memory": MemoryError(),
        }[exc]

    monkeypatch.setattr(demo, "run_demo_workload", boom)
    res = run("demo", "-n", "10", "-o", tmp_path / "d.json")
    assert_one_line_error(res, *words, usage=False)
