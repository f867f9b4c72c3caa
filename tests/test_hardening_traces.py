"""Hostile trace files: every way a record can be wrong is a KVTraceFormatError naming
``<file>:<line>`` (and the field), never a raw Python error (issue 11, defects 10 and 13)."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest

from sagellm_kv_cache.errors import KVConfigError, KVTraceFormatError
from traces import iter_trace, read_trace, write_trace
from traces._common import MAX_REQUEST_TOKENS, MAX_REQUEST_TOKENS_ENV

AZURE_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZURE_ROW = "2023-11-16 18:17:03.9799600,{n},10\n"
BURST_HEAD = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def mooncake_line(ts=0, n_in=512, n_out=8, ids=None, **extra) -> str:
    ids = [1] * -(-n_in // 512) if ids is None else ids
    rec = {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids}
    return json.dumps({**rec, **extra}) + "\n"


def bailian_line(chat=1, parent=-1, ts=0, n_in=16, n_out=4) -> str:
    rec = {
        "chat_id": chat,
        "parent_chat_id": parent,
        "timestamp": ts,
        "input_length": n_in,
        "output_length": n_out,
        "type": "text",
        "turn": 1,
        "hash_ids": list(range(-(-n_in // 16))),
    }
    return json.dumps(rec) + "\n"


def tokens_line(rid="r", ts=0, n=4, n_out=1) -> str:
    return (
        json.dumps({"request_id": rid, "timestamp": ts, "tokens": [1] * n, "output_length": n_out})
        + "\n"
    )


def expect_error(path, line: int, field: str | None = None, **kw) -> KVTraceFormatError:
    with pytest.raises(KVTraceFormatError) as info:
        read_trace(path, **kw)
    err = info.value
    assert err.code == "KV_TRACE_FORMAT"
    assert f"{path.name}:{line}:" in err.message, err.message
    if field is not None:
        assert f"field {field!r}" in err.message, err.message
    return err


def write(tmp_path, name: str, text: str | bytes):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


# -- defect 10: a length above the per-request maximum -----------------------------------------
@pytest.mark.parametrize("n", [200_000_000, 10**12])
def test_azure_huge_context_tokens_is_rejected_with_file_line_field(tmp_path, n):
    p = write(tmp_path, "az.csv", AZURE_HEAD + AZURE_ROW.format(n=100) + AZURE_ROW.format(n=n))
    err = expect_error(p, 3, "ContextTokens")
    assert str(MAX_REQUEST_TOKENS) in err.message


def test_max_request_tokens_argument_and_env_override(tmp_path, monkeypatch):
    p = write(tmp_path, "az.csv", AZURE_HEAD + AZURE_ROW.format(n=100))
    assert read_trace(p)["input_length"].to_list() == [100]
    expect_error(p, 2, "ContextTokens", max_request_tokens=99)
    monkeypatch.setenv(MAX_REQUEST_TOKENS_ENV, "50")
    expect_error(p, 2, "ContextTokens")
    assert read_trace(p, max_request_tokens=100).height == 1  # the argument wins
    monkeypatch.setenv(MAX_REQUEST_TOKENS_ENV, "many")
    with pytest.raises(KVConfigError) as info:
        read_trace(p)
    assert info.value.code == "KV_CONFIG_INVALID" and MAX_REQUEST_TOKENS_ENV in info.value.message
    with pytest.raises(KVConfigError):
        read_trace(p, max_request_tokens=0)


LONG = 2000  # above max_request_tokens=1000 below


@pytest.mark.parametrize(
    ("name", "text", "field"),
    [
        ("m.jsonl", mooncake_line() + mooncake_line(1, n_in=LONG), "input_length"),
        ("m2.jsonl", mooncake_line() + mooncake_line(1, n_out=LONG), "output_length"),
        ("b.jsonl", bailian_line() + bailian_line(2, n_in=LONG), "input_length"),
        (
            "g.csv",
            BURST_HEAD + "1,ChatGPT,10,1,11,Conversation log\n"
            f"2,ChatGPT,{LONG},1,{LONG + 1},Conversation log\n",
            "Request tokens",
        ),
        ("t.jsonl", tokens_line("a") + tokens_line("b", n_out=LONG), "output_length"),
    ],
    ids=["mooncake-in", "mooncake-out", "bailian", "burstgpt", "tokens-out"],
)
def test_every_length_reader_applies_the_maximum(tmp_path, name, text, field):
    path = write(tmp_path, name, text)
    line = 3 if name.endswith(".csv") else 2  # a CSV header is line 1
    expect_error(path, line, field, max_request_tokens=1000)
    assert read_trace(path, max_request_tokens=LONG + 1).height == 2


def test_token_list_longer_than_the_maximum(tmp_path):
    p = write(tmp_path, "t.jsonl", tokens_line("a", n=4) + tokens_line("b", n=9))
    expect_error(p, 2, "tokens", max_request_tokens=8)


def test_parquet_length_above_the_maximum(tmp_path):
    table = read_trace(write(tmp_path, "m.jsonl", mooncake_line() + mooncake_line(1, n_in=1024)))
    p = write_trace(table, tmp_path / "m.parquet")
    expect_error(p, 2, "input_length", max_request_tokens=1000)


# -- defect 13: undecodable, truncated, deep, huge, unbalanced, repeated --------------------
BAD_UTF8 = [
    ("m.jsonl", mooncake_line(), mooncake_line(1)),
    ("b.jsonl", bailian_line(1), bailian_line(2, ts=1)),
    ("t.jsonl", tokens_line("a"), tokens_line("b")),
    ("a.csv", AZURE_HEAD + AZURE_ROW.format(n=10), AZURE_ROW.format(n=20)),
    ("g.csv", BURST_HEAD + "1,ChatGPT,10,1,11,Conversation log\n", "2,ChatGPT,5,1,6,Conv\n"),
]


@pytest.mark.parametrize(("name", "first", "last"), BAD_UTF8, ids=[b[0] for b in BAD_UTF8])
def test_invalid_utf8_names_file_and_line(tmp_path, name, first, last):
    line = first.count("\n") + 1
    p = write(tmp_path, name, first.encode() + b'{"x": "\xff\xfe"}\n' + last.encode())
    expect_error(p, line)


@pytest.mark.parametrize(("name", "first", "last"), BAD_UTF8, ids=[b[0] for b in BAD_UTF8])
def test_invalid_utf8_line_is_skipped_with_skip_bad(tmp_path, name, first, last):
    p = write(tmp_path, name, first.encode() + b"\xff,\xfe\n" + last.encode())
    stats: dict = {}
    table = read_trace(p, skip_bad=True, stats=stats)
    assert table.height == 2 and stats["skipped"] == 1
    assert stats["skipped_lines"][0][0] == first.count("\n") + 1


def test_truncated_gzip_is_a_format_error(tmp_path):
    raw = gzip.compress("".join(mooncake_line(i) for i in range(2000)).encode())
    p = write(tmp_path, "m.jsonl.gz", raw[: len(raw) // 2])
    with pytest.raises(KVTraceFormatError) as info:
        read_trace(p)
    err = info.value
    assert err.code == "KV_TRACE_FORMAT" and "field '<gzip>'" in err.message
    assert err.message.startswith("m.jsonl.gz:") and "truncated" in err.message
    assert err.details["line"] > 1  # where it broke, after the lines that decompressed


@pytest.mark.parametrize("fmt", ["auto", "mooncake", "azure"])
def test_garbage_gzip_is_a_format_error(tmp_path, fmt):
    name = "a.csv.gz" if fmt == "azure" else "m.jsonl.gz"
    p = write(tmp_path, name, b"this is not gzip data at all\n" * 10)
    expect_error(p, 1, "<gzip>", format=fmt)


def test_deeply_nested_json_is_a_format_error(tmp_path):
    p = write(tmp_path, "m.jsonl", mooncake_line() + "[" * 100_000 + "]" * 100_000 + "\n")
    expect_error(p, 2, "<json>")


def test_json_integer_over_the_digit_limit_is_a_format_error(tmp_path):
    p = write(tmp_path, "m.jsonl", mooncake_line() + '{"timestamp": ' + "9" * 5000 + "}\n")
    expect_error(p, 2, "<json>")


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("m.jsonl", mooncake_line(ts=10**400)),
        ("b.jsonl", bailian_line(ts=10**400)),
        ("t.jsonl", tokens_line(ts=10**400)),
    ],
    ids=["mooncake", "bailian", "tokens"],
)
def test_401_digit_timestamp_is_a_format_error(tmp_path, name, line):
    expect_error(write(tmp_path, name, line), 1, "timestamp")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("m.jsonl", mooncake_line(n_out=2**64)),
        ("b.jsonl", bailian_line(n_out=2**64)),
        ("t.jsonl", tokens_line(n_out=2**64)),
    ],
    ids=["mooncake", "bailian", "tokens"],
)
def test_output_length_2_to_the_64_is_a_format_error(tmp_path, name, text):
    expect_error(write(tmp_path, name, text), 1, "output_length")


def test_bailian_turn_beyond_int64_is_a_format_error(tmp_path):
    rec = json.loads(bailian_line())
    rec["turn"] = 2**64
    expect_error(write(tmp_path, "b.jsonl", json.dumps(rec) + "\n"), 1, "turn")


def test_unbalanced_csv_quote_is_reported_where_the_record_starts(tmp_path):
    rows = [AZURE_ROW.format(n=10 + i) for i in range(6)]
    rows[2] = '"2023-11-16 18:17:04,10,10\n'  # line 4: the quote never closes
    p = write(tmp_path, "a.csv", AZURE_HEAD + "".join(rows))
    err = expect_error(p, 4, "<csv>")
    assert "a.csv:7" not in err.message


def test_unbalanced_quote_after_blank_lines(tmp_path):
    p = write(tmp_path, "a.csv", AZURE_HEAD + "\n\n" + '"x,1,1\n' + AZURE_ROW.format(n=3))
    expect_error(p, 4, "<csv>")


@pytest.mark.parametrize(
    ("name", "text", "field"),
    [
        ("b.jsonl", bailian_line(7) + bailian_line("7", ts=1), "chat_id"),
        ("b2.jsonl", bailian_line("x") + bailian_line("x", ts=1), "chat_id"),
        ("t.jsonl", tokens_line(7) + tokens_line("7", ts=1), "request_id"),
        (
            "t2.jsonl",
            tokens_line("t2-2") + tokens_line(None, ts=1).replace('"request_id": null, ', ""),
            "request_id",
        ),
    ],
    ids=["bailian-7-and-str-7", "bailian-str", "tokens-7-and-str-7", "tokens-default-id"],
)
def test_repeated_request_id_is_rejected_at_the_second_line(tmp_path, name, text, field):
    expect_error(write(tmp_path, name, text), 2, field)


def test_int_and_str_ids_are_one_id(tmp_path):
    # a parent given as 7 finds the chat given as "7": they are the same id
    p = write(tmp_path, "b.jsonl", bailian_line("7") + bailian_line(8, parent=7, ts=1))
    table = read_trace(p)
    assert table["request_id"].to_list() == ["7", "8"]
    assert table["session_id"].to_list() == ["7", "7"]


def test_parquet_repeated_request_id(tmp_path):
    table = read_trace(
        write(tmp_path, "m.jsonl", mooncake_line() + mooncake_line(1) + mooncake_line(2))
    )
    table = table.with_columns(pl.Series("request_id", ["a", "b", "a"]))
    p = write_trace(table, tmp_path / "dup.parquet")
    expect_error(p, 3, "request_id")
    # across batches too
    it = iter_trace(p)
    with pytest.raises(KVTraceFormatError):
        list(it)


def test_parquet_repeat_across_batches(tmp_path):
    from traces import iter_trace_batches

    table = read_trace(
        write(tmp_path, "m.jsonl", mooncake_line() + mooncake_line(1) + mooncake_line(2))
    )
    table = table.with_columns(pl.Series("request_id", ["a", "b", "a"]))
    p = write_trace(table, tmp_path / "dup.parquet")
    with pytest.raises(KVTraceFormatError) as info:
        list(iter_trace_batches(p, batch_size=2))
    assert "dup.parquet:3:" in info.value.message


def test_garbage_parquet_is_a_format_error(tmp_path):
    p = write(tmp_path, "x.parquet", b"PAR1 not really\n")
    with pytest.raises(KVTraceFormatError) as info:
        read_trace(p)
    assert info.value.code == "KV_TRACE_FORMAT" and "x.parquet" in info.value.message


def test_good_files_still_read_the_same(tmp_path):
    # the line-by-line decoding keeps every field and line number of a clean file
    p = write(tmp_path, "m.jsonl", mooncake_line() + "\n" + mooncake_line(1000, n_in=1024))
    table = read_trace(p)
    assert table["request_id"].to_list() == ["m-1", "m-3"]
    assert table["arrival_s"].to_list() == [0.0, 1.0]
    gz = tmp_path / "m.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert read_trace(gz).equals(table)
