"""Engine request logs in: vLLM token JSONL, SGLang dumps, LMCache lookups, OpenAI chat,
a `listen` recording; the detector picks each from its sample (traces/engine_logs.py,
traces/chat.py, traces/detect.py)."""

from __future__ import annotations

import json

import polars as pl
import pytest

from sagellm_kv_cache.errors import KVConfigError, KVTraceFormatError
from traces import bundled_path, detect_format, read_trace
from traces.chat import render_bytes
from traces.tokens import hash_tokens

SYS = list(range(1000, 1020))


def write(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


def record_events(tmp_path):
    from tests.test_vllm_events_cli import record

    return record(tmp_path / "rec")


# -- detection: one row per format, from its sample -----------------------------------------------
def _samples(tmp_path):
    """(path, expected format, read options) for every format."""
    tok = write(tmp_path / "tok.jsonl", [{"tokens": [1, 2, 3]}])
    pq = tmp_path / "t.parquet"
    read_trace(bundled_path()).head(3).write_parquet(pq)
    return [
        (bundled_path(), "mooncake", {}),
        (bundled_path("bailian-synthetic-sample"), "bailian", {}),
        (bundled_path("azure-code-sample"), "azure", {}),
        (bundled_path("burstgpt-synthetic-sample"), "burstgpt", {}),
        (tok, "tokens", {}),
        (pq, "parquet", {}),
        (bundled_path("vllm-sample"), "vllm", {}),
        (bundled_path("sglang-sample"), "sglang", {}),
        (bundled_path("lmcache-sample"), "lmcache", {}),
        (bundled_path("openai-chat-sample"), "openai-chat", {"tokenizer": "bytes"}),
        (record_events(tmp_path), "kv-events", {}),
    ]


def test_detector_picks_each_format_from_its_sample(tmp_path):
    from traces.io import FORMATS

    rows = _samples(tmp_path)
    assert sorted(f for _, f, _ in rows) == sorted(FORMATS)  # every format has a row
    for path, fmt, opts in rows:
        assert detect_format(path) == fmt, path
        assert len(read_trace(path, **opts)) > 0, fmt
        one_part = sorted(path.glob("*.parquet"))[0] if path.is_dir() else None
        if one_part is not None:  # a single recording part is a recording too
            assert detect_format(one_part) == "kv-events"


def test_vllm_prompt_token_ids_is_not_taken_for_mooncake(tmp_path):
    # before: detected as mooncake and failed with "field 'timestamp': missing"
    p = write(tmp_path / "v.jsonl", [{"prompt_token_ids": [5] * 20, "max_tokens": 4}])
    assert detect_format(p) == "vllm"
    t = read_trace(p)
    assert t.row(0) == ("v-1", 0.0, 20, 4, hash_tokens([5] * 20, 16), 16)


def test_undetectable_jsonl_names_the_known_keys(tmp_path):
    p = write(tmp_path / "x.jsonl", [{"prompt": "hi"}])
    with pytest.raises(KVTraceFormatError) as exc:
        detect_format(p)
    assert exc.value.code == "KV_TRACE_FORMAT"
    assert "x.jsonl:1" in exc.value.message and "prompt_token_ids (vllm)" in exc.value.message
    # a record with a Mooncake field still goes to the Mooncake reader (it names the field)
    q = write(tmp_path / "m.jsonl", [{"timestamp": 0, "input_length": 3}])
    assert detect_format(q) == "mooncake"
    with pytest.raises(KVTraceFormatError, match=r"m.jsonl:1: field 'output_length'"):
        read_trace(q)


def test_a_folder_that_is_not_a_recording(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(KVTraceFormatError, match="not one"):
        detect_format(tmp_path / "d")
    with pytest.raises(KVTraceFormatError, match="a folder, not a mooncake file"):
        read_trace(tmp_path / "d", format="mooncake")


# -- exact tables ------------------------------------------------------------------------------
def test_vllm_exact_table_and_output_length_precedence():
    t = read_trace(bundled_path("vllm-sample"))
    assert t["request_id"].to_list() == [f"cmpl-{i}" for i in range(5)]
    assert t["arrival_s"].to_list() == [0.0, 0.25, 1.5, 2.0, 2.0]
    assert t["input_length"].to_list() == [26, 33, 54, 57, 17]
    # output_token_ids (3), output_tokens, sampling_params.max_tokens, max_tokens, none
    assert t["output_length"].to_list() == [3, 40, 128, 16, 0]
    assert t["block_hashes"][0].to_list() == hash_tokens([*SYS, 1, 2, 3, 4, 5, 6], 16)
    # a shared 20-token system prompt: one shared full block
    firsts = [ids[0] for ids in t["block_hashes"].to_list()]
    assert len(set(firsts[:4])) == 1 and firsts[4] != firsts[0]


def test_sglang_exact_table():
    t = read_trace(bundled_path("sglang-sample"))
    assert t["request_id"].to_list() == ["a0", "a1", "a2", "a3"]
    assert t["arrival_s"].to_list() == [0.0, 0.5, 1.0, 2.25]
    assert t["input_length"].to_list() == [23, 32, 54, 56]
    # meta_info.completion_tokens, max_new_tokens, len(output_ids), completion_tokens
    assert t["output_length"].to_list() == [12, 64, 5, 8]
    assert t["block_hashes"][1].to_list() == hash_tokens([*SYS, *range(4, 16)], 16)


def test_lmcache_exact_table_and_chunk_size():
    t = read_trace(bundled_path("lmcache-sample"))
    assert t["block_hashes"].to_list() == [
        [101, 102, 103],
        [101, 102, 204],
        [101],
        [101, 102, 303, -1],
    ]
    assert t["block_size"].to_list() == [256] * 4
    assert t["output_length"].to_list() == [0] * 4
    assert t["input_length"].to_list() == [600, 520, 256, 900]
    with pytest.raises(
        KVTraceFormatError, match=r"lmcache_lookups_sample.jsonl:1: field 'chunk_size'"
    ):
        read_trace(bundled_path("lmcache-sample"), block_size=128)


def test_openai_chat_bytes_and_callable_and_template_tokenizers():
    p = bundled_path("openai-chat-sample")
    t = read_trace(p, tokenizer="bytes")
    assert t["request_id"].to_list() == ["c0", "c1", "c2", "c3"]  # custom_id for the Batch line
    assert t["output_length"].to_list() == [64, 80, 32, 7]
    first = json.loads(p.read_text().splitlines()[0])["messages"]
    assert t["input_length"][0] == len(render_bytes(first))
    assert t["block_hashes"][0].to_list() == hash_tokens(render_bytes(first), 16)
    # turn 2 of the conversation extends turn 1's rendering: its full blocks are shared
    b0, b1 = t["block_hashes"][0].to_list(), t["block_hashes"][1].to_list()
    n_full = t["input_length"][0] // 16
    assert b1[:n_full] == b0[:n_full]

    calls = []

    def by_words(messages):
        calls.append(len(messages))
        return [len(w) for m in messages for w in m["content"].split()]

    w = read_trace(p, tokenizer=by_words)
    assert calls == [2, 4, 2, 1] and w["input_length"][3] == 1

    class Template:  # the transformers interface: apply_chat_template
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize and add_generation_prompt
            return {"input_ids": [7] * (3 * len(messages))}

    assert read_trace(p, tokenizer=Template())["input_length"].to_list() == [6, 12, 6, 3]


def test_openai_chat_without_a_tokenizer_is_a_typed_error_naming_what_to_pass():
    with pytest.raises(KVConfigError) as exc:
        read_trace(bundled_path("openai-chat-sample"))
    assert exc.value.code == "KV_CONFIG_INVALID"
    assert "tokenizer=" in exc.value.message and "'bytes'" in exc.value.message
    with pytest.raises(KVConfigError, match="transformers"):
        read_trace(bundled_path("openai-chat-sample"), tokenizer="no/such-model-here")
    with pytest.raises(KVConfigError, match="tokenizer must be"):
        read_trace(bundled_path("openai-chat-sample"), tokenizer=3)


def test_openai_chat_tokenizer_failure_names_the_line(tmp_path):
    p = write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}]}] * 1)

    def broken(messages):
        raise RuntimeError("boom")

    with pytest.raises(
        KVTraceFormatError, match=r"c.jsonl:1: field 'messages': the tokenizer failed"
    ):
        read_trace(p, tokenizer=broken)
    with pytest.raises(KVTraceFormatError, match=r"c.jsonl:1: field 'messages'"):
        read_trace(p, tokenizer=lambda m: ["x"])


def test_kv_events_recording_reads_as_a_trace(tmp_path):
    rec = record_events(tmp_path)
    t = read_trace(rec)
    assert t["block_hashes"].to_list() == [[1, 2, 3], [1, 2, 4], [1, 2, 3, 5, 6], [7]]
    assert read_trace(rec, medium="CPU")["block_hashes"].to_list() == [[3, 5, 6]]
    with pytest.raises(KVConfigError, match="block size 4"):
        read_trace(rec, block_size=16)
    with pytest.raises(KVConfigError, match="takes no option"):
        read_trace(rec, tokenizer="bytes")


def test_kv_events_hostile_recordings_name_part_and_row(tmp_path):
    import pyarrow.parquet as pq

    rec = record_events(tmp_path)
    part = sorted(rec.glob("*.parquet"))[0]
    table = pq.read_table(part)
    payload = table.column("payload").to_pylist()
    payload[1] = b"\xc1 not msgpack"
    pq.write_table(
        table.set_column(table.schema.get_field_index("payload"), "payload", [payload]), part
    )
    with pytest.raises(KVTraceFormatError) as exc:
        read_trace(rec)
    assert exc.value.message.startswith(f"{part.name}:2: field 'payload'")
    # a batch recorded twice (same engine, rank, seq)
    rec2 = tmp_path / "twice"
    from tests.test_vllm_events_cli import BATCHES, record

    record(rec2, BATCHES[:1])
    record(rec2, BATCHES[:1])
    with pytest.raises(KVTraceFormatError, match="recorded twice"):
        read_trace(rec2)
    # a chain above the per-request maximum
    with pytest.raises(KVTraceFormatError, match="per-request maximum of 8 tokens"):
        read_trace(record_events(tmp_path / "x"), max_request_tokens=8)


# -- hostile lines: one row per case, typed error at file:line, skip_bad skips exactly it ----
V = {"prompt_token_ids": [1, 2, 3]}
S = {"input_ids": [1, 2, 3]}
L = {"num_tokens": 3, "chunk_hashes": [1], "chunk_size": 4}
C = {"messages": [{"role": "user", "content": "hi"}]}
BAD_LINES = [
    # (format, good first line, bad line, field)
    ("vllm", V, {"prompt_token_ids": []}, "prompt_token_ids"),
    ("vllm", V, {"prompt_token_ids": [[1, 2], [3]]}, "prompt_token_ids"),
    ("vllm", V, {"prompt_token_ids": [1, "2"]}, "prompt_token_ids"),
    ("vllm", V, {"prompt_token_ids": [2**63]}, "prompt_token_ids"),
    ("vllm", V, {**V, "output_tokens": -1}, "output_tokens"),
    ("vllm", V, {**V, "sampling_params": {"max_tokens": "9"}}, "sampling_params.max_tokens"),
    ("vllm", V, {**V, "sampling_params": []}, "sampling_params"),
    ("vllm", {**V, "arrival_time": 5}, {**V, "arrival_time": 4}, "arrival_time"),
    ("vllm", {**V, "request_id": 7}, {**V, "request_id": "7"}, "request_id"),
    ("vllm", V, {**V, "request_id": True}, "request_id"),
    ("vllm", V, '{"prompt_token_ids": [1,', "<json>"),
    ("sglang", S, {"input_ids": [[1], [2]]}, "input_ids"),
    ("sglang", S, {**S, "rid": ["a", "b"]}, "rid"),
    ("sglang", S, {**S, "meta_info": {"prompt_tokens": 4}}, "meta_info.prompt_tokens"),
    ("sglang", S, {**S, "meta_info": {"completion_tokens": 1.5}}, "meta_info.completion_tokens"),
    ("sglang", {**S, "rid": "x"}, {**S, "rid": "x"}, "rid"),
    ("lmcache", L, {**L, "chunk_hashes": [1, 2]}, "chunk_hashes"),
    ("lmcache", L, {**L, "chunk_hashes": ["zz"]}, "chunk_hashes"),
    ("lmcache", L, {**L, "chunk_hashes": [2**64]}, "chunk_hashes"),
    ("lmcache", L, {**L, "chunk_size": 8}, "chunk_size"),
    ("lmcache", L, {**L, "hit_tokens": 4}, "hit_tokens"),
    ("lmcache", L, {"chunk_hashes": [1]}, "num_tokens"),
    ("openai-chat", C, {"messages": []}, "messages"),
    ("openai-chat", C, {"messages": [{"content": "x"}]}, "messages[0]"),
    (
        "openai-chat",
        C,
        {"messages": [{"role": "u", "content": [{"type": "image_url"}]}]},
        "messages[0]",
    ),
    ("openai-chat", C, {**C, "body": 3}, "body"),
    ("openai-chat", C, {**C, "max_tokens": -2}, "max_tokens"),
]


@pytest.mark.parametrize(("fmt", "good", "bad_line", "field"), BAD_LINES)
def test_bad_line_names_file_line_field_and_skip_bad_skips_it(tmp_path, fmt, good, bad_line, field):
    opts = {"tokenizer": "bytes"} if fmt == "openai-chat" else {}
    p = write(tmp_path / "r.jsonl", [good, bad_line])
    with pytest.raises(KVTraceFormatError) as exc:
        read_trace(p, format=fmt, **opts)
    assert exc.value.code == "KV_TRACE_FORMAT"
    assert exc.value.message.startswith(f"r.jsonl:2: field {field!r}"), exc.value.message
    assert exc.value.details["line"] == 2
    if fmt != "openai-chat" or field != "body":
        assert detect_format(p) == fmt
    stats: dict = {}
    t = read_trace(p, format=fmt, skip_bad=True, stats=stats, **opts)
    assert (len(t), stats["rows"], stats["skipped"]) == (1, 1, 1)
    assert stats["skipped_lines"][0][0] == 2
    # the skipped line left nothing behind: the good line alone reads the same
    alone = read_trace(write(tmp_path / "r.jsonl", [good]), format=fmt, **opts)
    assert t.equals(alone)


@pytest.mark.parametrize(
    ("fmt", "rec", "field"),
    [
        ("vllm", {"prompt_token_ids": [1] * 50}, "prompt_token_ids"),
        ("vllm", {"prompt_token_ids": [1], "output_token_ids": [2] * 50}, "output_token_ids"),
        ("sglang", {"input_ids": [1] * 50}, "input_ids"),
        ("lmcache", {"num_tokens": 50, "chunk_hashes": [1], "chunk_size": 64}, "num_tokens"),
        ("openai-chat", {"messages": [{"role": "u", "content": "x" * 50}]}, "messages"),
    ],
)
def test_length_cap(tmp_path, monkeypatch, fmt, rec, field):
    p = write(tmp_path / "r.jsonl", [rec])
    opts = {"tokenizer": "bytes"} if fmt == "openai-chat" else {}
    with pytest.raises(KVTraceFormatError) as exc:
        read_trace(p, format=fmt, max_request_tokens=40, **opts)
    assert exc.value.message.startswith(f"r.jsonl:1: field {field!r}")
    assert "per-request maximum of 40" in exc.value.message
    monkeypatch.setenv("SAGELLM_KV_MAX_REQUEST_TOKENS", "40")
    with pytest.raises(KVTraceFormatError, match="per-request maximum of 40"):
        read_trace(p, format=fmt, **opts)


def test_streaming_equals_whole_file_for_each_new_format():
    from traces import iter_trace, iter_trace_batches

    for name, opts in [
        ("vllm-sample", {}),
        ("sglang-sample", {}),
        ("lmcache-sample", {}),
        ("openai-chat-sample", {"tokenizer": "bytes"}),
    ]:
        p = bundled_path(name)
        whole = read_trace(p, **opts)
        assert pl.concat(list(iter_trace_batches(p, batch_size=3, **opts))).equals(whole)
        assert [tuple(r)[:6] for r in iter_trace(p, **opts)] == list(whole.iter_rows())
