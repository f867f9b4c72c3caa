"""Trace readers, auto-detection, validation, streaming and writers (traces/)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_kv_cache.errors import KVConfigError, KVTraceFormatError
from sagellm_kv_cache.hashing import compute_block_hash, compute_block_hashes
from traces import (
    CANONICAL_COLUMNS,
    DEFAULT_TRACE,
    bundled_path,
    detect_format,
    digest_to_int64,
    generate_trace,
    iter_mooncake,
    iter_trace,
    iter_trace_batches,
    read_mooncake,
    read_trace,
    write_trace,
)

BASE = list(CANONICAL_COLUMNS[:6])
NO_PREFIX = {"system_prompt_prob": 0.0, "multi_turn_prob": 0.0}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jl(*recs):
    return [json.dumps(r) for r in recs]


def mc(ts, n_in, ids, n_out=1):
    return {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids}


def bl(chat, parent, ts, n_in, ids, turn=1, n_out=2, **extra):
    rec = {
        "chat_id": chat,
        "parent_chat_id": parent,
        "timestamp": ts,
        "input_length": n_in,
        "output_length": n_out,
        "type": "text",
        "turn": turn,
        "hash_ids": ids,
    }
    rec.update(extra)
    return rec


AZ_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
BG_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"


def canon(ids_lists):
    """Ids renamed by first appearance: equal iff the sharing structure is equal."""
    seen: dict[int, int] = {}
    return [[seen.setdefault(h, len(seen)) for h in ids] for ids in ids_lists]


# -- canonical columns ------------------------------------------------------------------------
def test_canonical_columns_order():
    names = "request_id arrival_s input_length output_length block_hashes block_size"
    assert (*names.split(), "session_id", "turn") == CANONICAL_COLUMNS


# -- each format on a hand-made file ----------------------------------------------------------
def test_mooncake_exact_table(tmp_path):
    p = write_lines(tmp_path / "m.jsonl", jl(mc(0, 600, [4, 5]), mc(1500, 512, [4], 7)))
    t = read_trace(p)
    assert t.columns == BASE
    assert t.rows() == [
        ("m-1", 0.0, 600, 1, [4, 5], 512),
        ("m-2", 1.5, 512, 7, [4], 512),
    ]
    assert t.schema["block_hashes"] == pl.List(pl.Int64)
    assert list(iter_mooncake(p)) == [r[:5] for r in t.rows()]
    assert read_mooncake(p).equals(t)


def test_mooncake_block_size_option(tmp_path):
    p = write_lines(tmp_path / "m.jsonl", jl(mc(0, 40, [1, 2, 3])))
    t = read_trace(p, format="mooncake", block_size=16)
    assert t.rows() == [("m-1", 0.0, 40, 1, [1, 2, 3], 16)]


def test_bailian_exact_table_and_sessions(tmp_path):
    p = write_lines(
        tmp_path / "b.jsonl",
        jl(
            bl(10, -1, 100.0, 20, [1, 2]),
            bl(11, 10, 100.5, 40, [1, 2, 3], turn=2),
            bl(30, -1, 101.0, 16, [9], type="search"),
            bl(12, 11, 102.0, 50, [1, 2, 3, 4], turn=3),
            bl(40, 99, 103.25, 1, [7], turn=5),  # parent not in the file: it is the root
        ),
    )
    t = read_trace(p)
    assert t.columns == list(CANONICAL_COLUMNS)
    assert t.rows() == [
        ("10", 0.0, 20, 2, [1, 2], 16, "10", 1),
        ("11", 0.5, 40, 2, [1, 2, 3], 16, "10", 2),
        ("30", 1.0, 16, 2, [9], 16, "30", 1),
        ("12", 2.0, 50, 2, [1, 2, 3, 4], 16, "10", 3),
        ("40", 3.25, 1, 2, [7], 16, "99", 5),
    ]


def test_azure_exact_table_without_prefix_model(tmp_path):
    p = write_lines(
        tmp_path / "az.csv",
        [
            AZ_HEADER,
            "2023-11-16 18:17:03.5000000,40,10",
            "2023-11-16 18:17:04.2500000,16,0",
            "2023-11-16 18:18:04,1,3",
        ],
    )
    t = read_trace(p, **NO_PREFIX)
    assert t.columns == list(CANONICAL_COLUMNS)
    assert t.rows() == [
        ("az-2", 0.0, 40, 10, [0, 1, 2], 16, "s1", 1),
        ("az-3", 0.75, 16, 0, [3], 16, "s2", 1),
        ("az-4", 60.5, 1, 3, [4], 16, "s3", 1),
    ]


def test_azure_shared_system_prompt(tmp_path):
    # one prompt of 32 tokens, always drawn: every request longer than 32 starts with [0, 1]
    p = write_lines(
        tmp_path / "az.csv",
        [AZ_HEADER] + [f"2023-11-16 18:17:0{i}.0,{n},5" for i, n in enumerate([40, 33, 32, 70])],
    )
    t = read_trace(
        p, num_system_prompts=1, system_prompt_tokens=32, system_prompt_prob=1.0, block_size=16
    )
    assert t["block_hashes"].to_list() == [[0, 1, 2], [0, 1, 3], [4, 5], [0, 1, 6, 7, 8]]


def test_azure_multi_turn_context_grows(tmp_path):
    # every request continues the single open session when its input exceeds the context
    p = write_lines(
        tmp_path / "az.csv",
        [AZ_HEADER]
        + [f"2023-11-16 18:17:0{i}.0,{n},{o}" for i, (n, o) in enumerate([(40, 10), (70, 5)])],
    )
    t = read_trace(p, system_prompt_prob=0.0, multi_turn_prob=1.0, max_open_sessions=1)
    # turn 1: ids 0,1,2 (40 tokens); context 50 tokens = full blocks [0, 1] + output block [3]
    assert t["block_hashes"].to_list() == [[0, 1, 2], [0, 1, 3, 4, 5]]
    assert t["session_id"].to_list() == ["s1", "s1"]
    assert t["turn"].to_list() == [1, 2]


def test_burstgpt_exact_table_and_model_filter(tmp_path):
    p = write_lines(
        tmp_path / "bg.csv",
        [
            BG_HEADER,
            "5,ChatGPT,20,4,24,Conversation log",
            "7.5,GPT-4,16,0,16,API log",
            "9,ChatGPT,0,3,3,Conversation log",
        ],
    )
    t = read_trace(p, **NO_PREFIX)
    assert t.rows() == [
        ("bg-2", 0.0, 20, 4, [0, 1], 16, "s1", 1),
        ("bg-3", 2.5, 16, 0, [2], 16, "s2", 1),
        ("bg-4", 4.0, 0, 3, [], 16, "s3", 1),
    ]
    stats: dict = {}
    t = read_trace(p, models=["ChatGPT"], stats=stats, **NO_PREFIX)
    assert t["request_id"].to_list() == ["bg-2", "bg-4"]
    assert stats["filtered"] == 1 and stats["rows"] == 2


def test_tokens_exact_hashes(tmp_path):
    toks_a = list(range(40))
    toks_b = list(range(32)) + [7]
    p = write_lines(
        tmp_path / "tk.jsonl",
        jl(
            {"request_id": "a", "timestamp": 2.0, "tokens": toks_a, "output_length": 3},
            {"tokens": toks_b},
            {"request_id": 5, "timestamp": 4.5, "tokens": [1, 2]},
        ),
    )
    t = read_trace(p)
    assert t.columns == BASE
    full = [digest_to_int64(d) for d in compute_block_hashes(toks_a, 16)]
    tail_a = digest_to_int64(compute_block_hash(compute_block_hashes(toks_a, 16)[-1], toks_a[32:]))
    tail_b = digest_to_int64(compute_block_hash(compute_block_hashes(toks_b, 16)[-1], [7]))
    assert t.rows() == [
        ("a", 0.0, 40, 3, [*full, tail_a], 16),
        ("tk-2", 0.0, 33, 0, [*full[:2], tail_b], 16),
        ("5", 2.5, 2, 0, [digest_to_int64(compute_block_hash(None, [1, 2]))], 16),
    ]
    t4 = read_trace(p, block_size=4)
    assert t4["block_hashes"][0].to_list() == [
        digest_to_int64(d) for d in compute_block_hashes(toks_a, 4)
    ]
    salted = read_trace(p, extra_keys="tenant-1")["block_hashes"][0].to_list()
    assert salted[0] == digest_to_int64(compute_block_hashes(toks_a, 16, extra_keys="tenant-1")[0])
    assert salted[0] != full[0]


HASHSEED_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from traces import read_trace
t = read_trace({path!r}, format="tokens", block_size=8)
print(json.dumps(t["block_hashes"].to_list()))
"""


def test_tokens_hashes_independent_of_pythonhashseed(tmp_path):
    p = write_lines(tmp_path / "tk.jsonl", jl({"tokens": list(range(100))}, {"tokens": [3] * 17}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = read_trace(p, format="tokens", block_size=8)["block_hashes"].to_list()
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", HASHSEED_SCRIPT.format(root=root, path=str(p))],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert json.loads(out.stdout) == here


def test_gzip_text_formats(tmp_path):
    p = tmp_path / "m.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(jl(mc(0, 600, [4, 5]), mc(3, 10, [6]))) + "\n")
    assert detect_format(p) == "mooncake"
    assert read_trace(p).rows() == [
        ("m-1", 0.0, 600, 1, [4, 5], 512),
        ("m-2", 0.003, 10, 1, [6], 512),
    ]


# -- detection and options --------------------------------------------------------------------
def test_auto_detection(tmp_path):
    cases = {
        "a.jsonl": jl(mc(0, 10, [1])),
        "b.jsonl": jl(bl(1, -1, 0, 10, [1])),
        "c.jsonl": jl({"tokens": [1, 2]}),
        "d.csv": [AZ_HEADER],
        "e.csv": [BG_HEADER],
        "f.trace": [BG_HEADER],
        "g.txt": jl({"tokens": [1]}),
        "h.jsonl": ["{not json"],  # a .jsonl that cannot be sniffed is read as Mooncake
    }
    expected = ["mooncake", "bailian", "tokens", "azure", "burstgpt", "burstgpt", "tokens"]
    expected.append("mooncake")
    for (name, lines), fmt in zip(cases.items(), expected):
        assert detect_format(write_lines(tmp_path / name, lines)) == fmt, name
    write_trace(read_trace(tmp_path / "a.jsonl"), tmp_path / "x.parquet")
    assert detect_format(tmp_path / "x.parquet") == "parquet"


def test_unknown_and_undetectable_formats(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", jl(mc(0, 10, [1])))
    with pytest.raises(KVTraceFormatError, match="unknown trace format 'sharegpt'"):
        read_trace(p, format="sharegpt")
    q = write_lines(tmp_path / "q.csv", ["a,b,c", "1,2,3"])
    with pytest.raises(KVTraceFormatError, match="cannot tell the trace format"):
        read_trace(q)
    with pytest.raises(KVConfigError, match="takes no option"):
        read_trace(p, seed=3)
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "missing.jsonl")


# -- malformed input --------------------------------------------------------------------------
MC_GOOD = json.dumps(mc(0, 10, [1]))
BL_GOOD = json.dumps(bl(1, -1, 5.0, 10, [1]))
TK_GOOD = json.dumps({"timestamp": 5, "tokens": [1, 2, 3]})
AZ_GOOD = "2023-11-16 18:17:03.5,10,1"
BG_GOOD = "5,ChatGPT,10,1,11,Conversation log"

BAD_CASES = [
    # (format, file name, header or None, good line, bad line, field)
    ("mooncake", "m.jsonl", None, MC_GOOD, '{"timestamp": 1, "input_length": 1', "<json>"),
    ("mooncake", "m.jsonl", None, MC_GOOD, "[1, 2]", "<json>"),
    ("mooncake", "m.jsonl", None, MC_GOOD, json.dumps(mc(0, 10, [1, 2])), "hash_ids"),
    ("mooncake", "m.jsonl", None, MC_GOOD, json.dumps(mc(0, 10, ["x"])), "hash_ids"),
    ("mooncake", "m.jsonl", None, MC_GOOD, json.dumps(mc(0, 10, [2**64])), "hash_ids"),
    ("mooncake", "m.jsonl", None, MC_GOOD, json.dumps(mc(0, -3, [])), "input_length"),
    ("mooncake", "m.jsonl", None, json.dumps(mc(9, 10, [1])), MC_GOOD, "timestamp"),
    ("bailian", "b.jsonl", None, BL_GOOD, BL_GOOD, "chat_id"),  # duplicate chat_id
    ("bailian", "b.jsonl", None, BL_GOOD, json.dumps(bl(2, -1, 4.0, 10, [1])), "timestamp"),
    ("bailian", "b.jsonl", None, BL_GOOD, json.dumps(bl(2, -1, 6, 10, [1, 2])), "hash_ids"),
    ("bailian", "b.jsonl", None, BL_GOOD, json.dumps(bl(2, -1, 6, 10, [1], turn="2")), "turn"),
    (
        "bailian",
        "b.jsonl",
        None,
        BL_GOOD,
        json.dumps(bl(2, -1, 6, 10, [1], n_out=-1)),
        "output_length",
    ),
    ("bailian", "b.jsonl", None, BL_GOOD, json.dumps(bl(2, -1, 6, 10, [1], type=3)), "type"),
    ("bailian", "b.jsonl", None, BL_GOOD, json.dumps(bl(2, 2, 6, 10, [1])), "parent_chat_id"),
    (
        "bailian",
        "b.jsonl",
        None,
        BL_GOOD,
        json.dumps({k: v for k, v in bl(2, -1, 6, 10, [1]).items() if k != "parent_chat_id"}),
        "parent_chat_id",
    ),
    ("bailian", "b.jsonl", None, BL_GOOD, "{oops", "<json>"),
    ("tokens", "t.jsonl", None, TK_GOOD, '{"timestamp": 6}', "tokens"),
    ("tokens", "t.jsonl", None, TK_GOOD, '{"tokens": []}', "tokens"),
    ("tokens", "t.jsonl", None, TK_GOOD, '{"tokens": [1, "a"]}', "tokens"),
    ("tokens", "t.jsonl", None, TK_GOOD, '{"tokens": [1], "output_length": -2}', "output_length"),
    ("tokens", "t.jsonl", None, TK_GOOD, '{"tokens": [1], "timestamp": 4}', "timestamp"),
    ("tokens", "t.jsonl", None, TK_GOOD, '{"tokens": [1], "timestamp": "now"}', "timestamp"),
    ("tokens", "t.jsonl", None, TK_GOOD, '{"tokens": [1], "request_id": [1]}', "request_id"),
    ("azure", "a.csv", AZ_HEADER, AZ_GOOD, "2023-11-16 18:17:04,x,1", "ContextTokens"),
    ("azure", "a.csv", AZ_HEADER, AZ_GOOD, "2023-11-16 18:17:04,10,-1", "GeneratedTokens"),
    ("azure", "a.csv", AZ_HEADER, AZ_GOOD, "yesterday,10,1", "TIMESTAMP"),
    ("azure", "a.csv", AZ_HEADER, AZ_GOOD, "2023-11-16 18:17:02,10,1", "TIMESTAMP"),
    ("azure", "a.csv", AZ_HEADER, AZ_GOOD, "2023-11-16 18:17:04,10", "<csv>"),
    ("azure", "a.csv", AZ_HEADER, AZ_GOOD, '2023-11-16 18:17:04,"10"x,1', "<csv>"),
    ("burstgpt", "g.csv", BG_HEADER, BG_GOOD, "6,ChatGPT,10,1,12,API log", "Total tokens"),
    ("burstgpt", "g.csv", BG_HEADER, BG_GOOD, "6,ChatGPT,-10,1,-9,API log", "Request tokens"),
    ("burstgpt", "g.csv", BG_HEADER, BG_GOOD, "6,ChatGPT,10,1.5,11,API log", "Response tokens"),
    ("burstgpt", "g.csv", BG_HEADER, BG_GOOD, "4,ChatGPT,10,1,11,API log", "Timestamp"),
    ("burstgpt", "g.csv", BG_HEADER, BG_GOOD, "6,,10,1,11,API log", "Model"),
    ("burstgpt", "g.csv", BG_HEADER, BG_GOOD, "6,ChatGPT,10,1,11,API log,extra", "<csv>"),
]


def later(good: str) -> str:
    """A valid record after ``good``: later timestamp, new chat id."""
    if good.startswith("{"):
        rec = json.loads(good)
        rec["timestamp"] = 9
        if "chat_id" in rec:
            rec["chat_id"] = 3
        return json.dumps(rec)
    return good.replace("5", "9", 1)


@pytest.mark.parametrize("fmt,name,header,good,bad_line,field", BAD_CASES)
def test_malformed_record_names_file_line_and_field(
    tmp_path, fmt, name, header, good, bad_line, field
):
    head = [header] if header else []
    p = write_lines(tmp_path / name, head + [good, bad_line, later(good)])
    line = len(head) + 2
    with pytest.raises(KVTraceFormatError) as err:
        read_trace(p, format=fmt)
    assert f"{name}:{line}: field '{field}'" in str(err.value)
    assert err.value.code == "KV_TRACE_FORMAT"
    assert err.value.details["line"] == line and err.value.details["field"] == field
    stats: dict = {}
    got = read_trace(p, format=fmt, skip_bad=True, stats=stats)
    assert stats["skipped"] == 1 and stats["skipped_lines"][0][0] == line
    assert got.height == stats["rows"]
    if fmt != "mooncake" or field != "timestamp":  # there the first line is the odd one
        assert got.height == 2
    # auto-detection sees the same format and gives the same error
    with pytest.raises(KVTraceFormatError, match=f"{name}:{line}: field '{field}'"):
        read_trace(p)


def test_missing_csv_header_column(tmp_path):
    p = write_lines(tmp_path / "a.csv", ["TIMESTAMP,GeneratedTokens", "2023-11-16 18:17:04,1"])
    with pytest.raises(KVTraceFormatError, match=r"a.csv:1: field 'ContextTokens': missing"):
        read_trace(p, format="azure")


def test_skip_bad_counts_several(tmp_path):
    lines = jl(mc(0, 10, [1])) + ["{", "[]", json.dumps(mc(1, 10, [1, 2]))] + jl(mc(2, 10, [3]))
    p = write_lines(tmp_path / "m.jsonl", lines)
    stats: dict = {}
    t = read_trace(p, skip_bad=True, stats=stats)
    assert t["request_id"].to_list() == ["m-1", "m-5"]
    assert stats["skipped"] == 3 and [ln for ln, _ in stats["skipped_lines"]] == [2, 3, 4]


# -- streaming equals whole-file reads --------------------------------------------------------
STREAM_CASES = [
    (DEFAULT_TRACE, {}),
    (bundled_path("bailian-synthetic-sample"), {}),
    (bundled_path("azure-conv-sample"), {"multi_turn_prob": 0.3, "seed": 4}),
    (bundled_path("burstgpt-synthetic-sample"), {"num_documents": 5, "document_prob": 0.5}),
]


@pytest.mark.parametrize("path,opts", STREAM_CASES, ids=lambda x: getattr(x, "name", ""))
def test_streaming_equals_whole_file(path, opts):
    whole = read_trace(path, **opts)
    assert whole.height > 300
    for batch_size in (1, 7, 1000, 10**6):
        if batch_size == 1 and whole.height > 500:
            continue
        batches = list(iter_trace_batches(path, batch_size=batch_size, **opts))
        assert all(b.height <= batch_size for b in batches)
        assert pl.concat(batches).equals(whole)
    assert [tuple(r)[: whole.width] for r in iter_trace(path, **opts)] == whole.rows()


def test_streaming_tokens_and_empty_file(tmp_path):
    p = write_lines(
        tmp_path / "t.jsonl", jl(*({"tokens": list(range(i, i + 40))} for i in range(9)))
    )
    whole = read_trace(p)
    assert pl.concat(list(iter_trace_batches(p, batch_size=4))).equals(whole)
    e = tmp_path / "e.jsonl"
    e.write_text("")
    batches = list(iter_trace_batches(e, format="mooncake"))
    assert len(batches) == 1 and batches[0].height == 0 and batches[0].columns == BASE


def test_iter_trace_is_lazy(tmp_path):
    lines = jl(mc(0, 10, [1]), mc(1, 10, [2])) + ["{broken"]
    p = write_lines(tmp_path / "m.jsonl", lines)
    it = iter_trace(p)
    assert next(it)[0] == "m-1" and next(it)[0] == "m-2"
    with pytest.raises(KVTraceFormatError, match=r"m\.jsonl:3"):
        next(it)


# -- writers ----------------------------------------------------------------------------------
def test_parquet_round_trip_exact(tmp_path):
    for table in (
        read_trace(DEFAULT_TRACE),
        read_trace(bundled_path("bailian-synthetic-sample")),
    ):
        p = write_trace(table, tmp_path / "t.parquet", format="parquet")
        back = read_trace(p)
        assert back.equals(table) and back.schema == table.schema
        assert pl.concat(list(iter_trace_batches(p, batch_size=333))).equals(table)
        assert [tuple(r)[: table.width] for r in iter_trace(p)] == table.rows()


def test_parquet_reader_validates(tmp_path):
    t = read_trace(DEFAULT_TRACE).head(5)
    bad = t.with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(pl.lit(1))
        .otherwise(pl.col("input_length"))
        .alias("input_length")
    )
    p = write_trace(bad, tmp_path / "bad.parquet")
    with pytest.raises(KVTraceFormatError, match=r"bad.parquet:4: field 'block_hashes'"):
        read_trace(p)
    t.drop("block_size").write_parquet(tmp_path / "nocol.parquet")
    with pytest.raises(KVTraceFormatError, match="field 'block_size': missing column"):
        read_trace(tmp_path / "nocol.parquet")
    ok = write_trace(t, tmp_path / "ok.parquet")
    assert read_trace(ok, block_size=512).equals(t)
    with pytest.raises(KVConfigError, match="keeps its stored block size 512"):
        read_trace(ok, block_size=16)
    unsorted = t.with_columns(pl.Series("arrival_s", [0.0, 2.0, 1.0, 3.0, 4.0]))
    with pytest.raises(KVTraceFormatError, match=r"u.parquet:3: field 'arrival_s': unsorted"):
        read_trace(write_trace(unsorted, tmp_path / "u.parquet"))


def test_mooncake_round_trip(tmp_path):
    table = read_trace(DEFAULT_TRACE)
    p = write_trace(table, tmp_path / DEFAULT_TRACE.name, format="mooncake")
    assert read_trace(p).equals(table)
    lines_in = DEFAULT_TRACE.read_text().splitlines()[:3]
    lines_out = p.read_text().splitlines()[:3]
    assert [json.loads(x) for x in lines_in] == [json.loads(x) for x in lines_out]


def test_bailian_round_trip(tmp_path):
    table = read_trace(bundled_path("bailian-synthetic-sample"))
    p = write_trace(table, tmp_path / "b.jsonl", format="bailian")
    assert read_trace(p).equals(table)


def test_tokens_writer_keeps_sharing_structure(tmp_path):
    table = read_trace(bundled_path("bailian-synthetic-sample")).head(60)
    p = write_trace(table, tmp_path / "t.jsonl", format="tokens")
    back = read_trace(p)
    assert back.select(BASE[:4]).equals(table.select(BASE[:4]))
    assert canon(back["block_hashes"].to_list()) == canon(table["block_hashes"].to_list())


def test_burstgpt_writer_round_trip(tmp_path):
    table = read_trace(bundled_path("burstgpt-synthetic-sample"), **NO_PREFIX)
    p = write_trace(table, tmp_path / "g.csv", format="burstgpt", model="GPT-4")
    back = read_trace(p, **NO_PREFIX)
    cols = ["arrival_s", "input_length", "output_length", "block_hashes"]
    assert back.select(cols).equals(table.select(cols))


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(KVConfigError):
        write_trace(read_trace(DEFAULT_TRACE).head(2), tmp_path / "x", format="sharegpt")
    with pytest.raises(ValueError, match="missing columns"):
        write_trace(pl.DataFrame({"a": [1]}), tmp_path / "x.parquet")


# -- properties -------------------------------------------------------------------------------
BAD_MOONCAKE_LINES = [
    "{",
    "[]",
    '{"timestamp": 0}',
    '{"timestamp": 0, "input_length": 0, "output_length": 0, "hash_ids": []}',
    '{"timestamp": 0, "input_length": 3, "output_length": 0, "hash_ids": [1, 2]}',
    '{"timestamp": -1, "input_length": 3, "output_length": 0, "hash_ids": [1]}',
]


@given(
    kinds=st.lists(st.one_of(st.none(), st.integers(0, len(BAD_MOONCAKE_LINES) - 1)), max_size=30)
)
@settings(max_examples=40, deadline=None)
def test_skip_bad_equals_reading_only_the_good_lines(tmp_path_factory, kinds):
    d = tmp_path_factory.mktemp("prop")
    lines, good = [], []
    for i, k in enumerate(kinds):
        if k is None:
            line = json.dumps(mc(i, 1 + 600 * i, list(range(-(-(1 + 600 * i) // 512)))))
            good.append(len(lines) + 1)
        else:
            line = BAD_MOONCAKE_LINES[k]
        lines.append(line)
    p = d / "m.jsonl"
    p.write_text("\n".join(lines) + "\n")
    stats: dict = {}
    t = read_trace(p, skip_bad=True, stats=stats)
    assert t["request_id"].to_list() == [f"m-{n}" for n in good]
    assert stats["skipped"] == len(kinds) - len(good) and stats["rows"] == len(good)
    if len(good) < len(kinds):
        with pytest.raises(KVTraceFormatError):
            read_trace(p)


@given(seed=st.integers(0, 2**20), multi=st.floats(0, 1), bs=st.sampled_from([4, 16, 512]))
@settings(max_examples=15, deadline=None)
def test_writers_round_trip_generated_tables(tmp_path_factory, seed, multi, bs):
    d = tmp_path_factory.mktemp("rt")
    t = generate_trace(25, seed=seed, block_size=bs, multi_turn_prob=multi)
    assert read_trace(write_trace(t, d / "t.parquet")).equals(t)
    m = read_trace(write_trace(t, d / "t.jsonl", "mooncake"), block_size=bs)
    cols = ["input_length", "output_length", "block_hashes", "block_size"]
    assert m.select(cols).equals(t.select(cols))
    assert m["arrival_s"].to_list() == pytest.approx(t["arrival_s"].to_list(), abs=1e-9)
    b = read_trace(write_trace(t, d / "b.jsonl", "bailian"), block_size=bs)
    assert b.select([*cols, "arrival_s", "turn"]).equals(t.select([*cols, "arrival_s", "turn"]))
    # sessions survive as the same partition of requests
    assert canon([[s] for s in b["session_id"]]) == canon([[s] for s in t["session_id"]])
