"""``sage-kv-stats convert`` and the writers: read, write, read gives the same table
(up to what each format documents it does not keep, traces/writers.py)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

from cli.convert_cmds import READ_FORMATS, WRITE_FORMATS, convert
from traces import bundled_path, read_trace, write_trace
from traces.io import FORMATS
from traces.io import WRITE_FORMATS as LIB_WRITE_FORMATS

NO_PREFIX = {"system_prompt_prob": 0.0, "multi_turn_prob": 0.0}


def canon(ids_lists):
    """Ids renamed by first appearance: equal iff the sharing structure is equal."""
    seen: dict[int, int] = {}
    return [[seen.setdefault(h, len(seen)) for h in ids] for ids in ids_lists]


def run(*args):
    return CliRunner().invoke(convert, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.splitlines() if x.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_choices_track_the_library():
    assert ("auto", *FORMATS) == READ_FORMATS
    assert set(WRITE_FORMATS) == set(LIB_WRITE_FORMATS)


# -- what each output format keeps -----------------------------------------------------------
def shifted(t):
    return t["arrival_s"] - t["arrival_s"][0] if len(t) else t["arrival_s"]


def assert_kept(fmt, src, back):
    """``back`` (read from ``fmt``) equals ``src`` up to what ``fmt`` does not keep."""
    assert len(back) == len(src)
    lengths = ["input_length", "block_size"]
    assert back.select(lengths).equals(src.select(lengths)), fmt
    ids, ids_back = src["block_hashes"].to_list(), back["block_hashes"].to_list()
    if fmt in ("parquet",):
        assert back.equals(src)
        return
    if fmt in ("tokens", "vllm", "sglang"):
        assert canon(ids_back) == canon(ids)
    elif fmt != "burstgpt":
        assert ids_back == ids
    if fmt in ("tokens", "vllm", "sglang", "lmcache"):
        assert back["request_id"].to_list() == src["request_id"].to_list()
        assert back["arrival_s"].to_list() == pytest.approx(shifted(src).to_list(), abs=1e-9)
    else:
        assert back["arrival_s"].to_list() == pytest.approx(src["arrival_s"].to_list(), abs=1e-6)
    want_out = [0] * len(src) if fmt == "lmcache" else src["output_length"].to_list()
    assert back["output_length"].to_list() == want_out


def sources(tmp_path):
    """(name, path, read options) of one small input per readable format."""
    from tests.test_vllm_events_cli import record

    small = tmp_path / "src"
    small.mkdir()
    mc = write_trace(read_trace(bundled_path()).head(40), small / "mc.jsonl", "mooncake")
    tok = write_trace(
        read_trace(bundled_path("bailian-synthetic-sample")).head(30), small / "tok.jsonl", "tokens"
    )
    pq = write_trace(
        read_trace(bundled_path("bailian-synthetic-sample")).head(30), small / "t.parquet"
    )
    return [
        ("mooncake", mc, {}),
        ("bailian", bundled_path("bailian-synthetic-sample"), {}),
        ("azure", bundled_path("azure-code-sample"), NO_PREFIX),
        ("burstgpt", bundled_path("burstgpt-synthetic-sample"), NO_PREFIX),
        ("tokens", tok, {}),
        ("parquet", pq, {}),
        ("vllm", bundled_path("vllm-sample"), {}),
        ("sglang", bundled_path("sglang-sample"), {}),
        ("lmcache", bundled_path("lmcache-sample"), {}),
        ("openai-chat", bundled_path("openai-chat-sample"), {"tokenizer": "bytes"}),
        ("kv-events", record(tmp_path / "rec"), {}),
    ]


def test_every_readable_format_round_trips_through_every_writer(tmp_path):
    srcs = sources(tmp_path)
    assert sorted(n for n, _, _ in srcs) == sorted(FORMATS)
    for name, path, opts in srcs:
        src = read_trace(path, **opts)
        if name in ("azure", "burstgpt"):
            src = src.head(60)
        for fmt in LIB_WRITE_FORMATS:
            out = (
                tmp_path
                / f"{name}-to-{fmt}.{'parquet' if fmt == 'parquet' else 'csv' if fmt == 'burstgpt' else 'jsonl'}"
            )
            write_trace(src, out, fmt)
            bs = int(src["block_size"][0])
            kw = NO_PREFIX if fmt == "burstgpt" else {}
            back = read_trace(
                out, fmt, block_size=None if fmt in ("parquet", "lmcache") else bs, **kw
            )
            if fmt == "burstgpt":  # lengths and times only; blocks re-modelled
                assert back["input_length"].to_list() == src["input_length"].to_list()
                continue
            assert_kept(fmt, src.select(back.columns) if fmt == "parquet" else src, back)


@pytest.mark.parametrize(
    "fmt", ["mooncake", "bailian", "tokens", "parquet", "vllm", "sglang", "lmcache"]
)
def test_cli_read_write_read_gives_equal_tables(tmp_path, fmt):
    """A file in ``fmt`` converted to ``fmt`` reads back as the same table (token
    formats: the same table with block ids renamed one to one)."""
    srcs = {n: (p, o) for n, p, o in sources(tmp_path)}
    path, _ = srcs[fmt]
    first = read_trace(path)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / path.name  # same name: Mooncake ids are "<stem>-<line>"
    result = run(path, out, "--to", fmt, "--block-size", int(first["block_size"][0]))
    assert result.exit_code == 0, result.output
    assert f"({fmt}) -> {out} ({fmt}): {len(first)} requests" in result.output
    again = read_trace(
        out, block_size=None if fmt in ("parquet", "lmcache") else int(first["block_size"][0])
    )
    if fmt in ("tokens", "vllm", "sglang"):
        assert canon(again["block_hashes"].to_list()) == canon(first["block_hashes"].to_list())
        again = again.with_columns(block_hashes=first["block_hashes"])
    assert again.equals(first)


def test_cli_converts_a_recording_and_a_chat_log(tmp_path):
    from tests.test_vllm_events_cli import record

    rec = record(tmp_path / "rec")
    out = tmp_path / "events.jsonl"
    result = run(rec, out, "--to", "mooncake")
    assert result.exit_code == 0, result.output
    assert "(kv-events)" in result.output
    back = read_trace(out, block_size=4)
    assert back["block_hashes"].to_list() == [[1, 2, 3], [1, 2, 4], [1, 2, 3, 5, 6], [7]]
    cpu = tmp_path / "cpu.parquet"
    assert run(rec, cpu, "--medium", "CPU").exit_code == 0
    assert read_trace(cpu)["block_hashes"].to_list() == [[3, 5, 6]]
    chat = tmp_path / "chat.parquet"
    result = run(bundled_path("openai-chat-sample"), chat, "--tokenizer", "bytes")
    assert result.exit_code == 0, result.output
    assert read_trace(chat).equals(
        read_trace(bundled_path("openai-chat-sample"), tokenizer="bytes")
    )


def test_cli_skip_bad_reports_the_count(tmp_path):
    p = tmp_path / "v.jsonl"
    p.write_text(json.dumps({"prompt_token_ids": [1, 2]}) + "\n" + "{oops\n")
    result = run(p, tmp_path / "o.parquet", "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "1 requests (1 malformed records skipped)" in result.output


# -- mistakes: one line naming the option, or file:line -----------------------------------------
def test_cli_errors_are_one_line(tmp_path):
    good = bundled_path("vllm-sample")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt_token_ids": [1]}) + "\n" + json.dumps({"prompt_token_ids": "x"}) + "\n"
    )
    existing = tmp_path / "exists.jsonl"
    existing.write_text("")
    cases = [
        ((bad, tmp_path / "o.parquet"), "bad.jsonl:2: field 'prompt_token_ids'"),
        ((good, tmp_path / "o.jsonl"), "--to"),
        ((tmp_path / "missing.jsonl", tmp_path / "o.parquet"), "IN"),
        ((good, existing, "--to", "vllm"), "--force"),
        ((good, good, "--to", "vllm", "--force"), "OUT must differ from IN"),
        ((good, tmp_path / "o.parquet", "--tokenizer", "bytes"), "--tokenizer"),
        ((bundled_path("openai-chat-sample"), tmp_path / "o.parquet"), "--tokenizer"),
        ((good, tmp_path / "o.jsonl", "--to", "sharegpt"), "--to"),
        ((good, tmp_path / "o.parquet", "--endpoint", "tcp://x:1"), "--endpoint"),
        ((good, existing / "sub" / "o.parquet"), "OUT"),
        (
            (bundled_path("lmcache-sample"), tmp_path / "o.parquet", "--block-size", "16"),
            "lmcache_lookups_sample.jsonl:1: field 'chunk_size'",
        ),
    ]
    for args, needle in cases:
        result = run(*args)
        line = one_error_line(result)
        assert needle in line, (args, result.output)
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "o.jsonl").exists()
    assert existing.read_text() == ""


def test_help_has_examples():
    result = CliRunner().invoke(convert, ["--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "--tokenizer" in result.output
    assert isinstance(pl.DataFrame, type)
