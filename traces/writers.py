"""Writers: the canonical table as each writable format (used by ``traces.io.write_trace``).

What each keeps (reading the file back with the same ``block_size``):

==========  ===================================================================
format      a table read back from it equals the written one except
==========  ===================================================================
parquet     nothing: identical
mooncake    ``request_id`` (``"<stem>-<line>"``), sessions; ``arrival_s`` kept to 1 us
bailian     ``request_id`` when not an integer (the row number); session ids
            (the same partition of requests, named by their first chat_id)
tokens      block ids (renamed one to one: the same sharing structure);
            ``arrival_s`` shifted to start at 0
vllm        as tokens
sglang      as tokens
lmcache     ``output_length`` (0), sessions; ``arrival_s`` shifted to start at 0
burstgpt    everything but lengths and times (re-modelled on reading)
==========  ===================================================================

Token formats carry token ids made by :func:`traces.synthetic.ids_to_tokens`
(option ``vocab_size``, default 32000): equal ids give equal blocks, so the
library's hashes of them share exactly where the ids did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._common import BASE_COLUMNS, SESSION_COLUMNS

__all__ = ["JSONL_WRITERS", "write_burstgpt", "write_jsonl"]


def _ms(arrival_s: float):
    ms = round(arrival_s * 1000.0, 6)
    return int(ms) if ms == int(ms) else ms


def _tokens(ids, n_in, bs, options) -> list[int]:
    from .synthetic import ids_to_tokens

    return ids_to_tokens(ids, n_in, bs, options.get("vocab_size", 32000))


def _mooncake(i, row, ctx, options) -> dict:
    _, t, n_in, n_out, ids, _ = row[:6]
    return {"timestamp": _ms(t), "input_length": n_in, "output_length": n_out, "hash_ids": ids}


def _bailian(i, row, ctx, options) -> dict:
    rid, t, n_in, n_out, ids, _ = row[:6]
    chat = int(rid) if rid.lstrip("-").isdigit() else i
    sid, turn = row[6:8] if len(row) > 6 else (None, None)
    last_chat = ctx.setdefault("last_chat", {})
    parent = last_chat.get(sid, -1) if sid is not None else -1
    if sid is not None:
        last_chat[sid] = chat
    return {
        "chat_id": chat,
        "parent_chat_id": parent,
        "timestamp": t,
        "input_length": n_in,
        "output_length": n_out,
        "type": "text",
        "turn": 1 if turn is None else turn,
        "hash_ids": ids,
    }


def _token_writer(id_key: str, time_key: str, tokens_key: str, output_key: str):
    """A token-level format's writer, by its field names (``output_key`` may be a
    dotted path into a nested object: ``"sampling_params.max_new_tokens"``)."""
    *outer, inner = output_key.split(".")

    def write(i, row, ctx, options) -> dict:
        rid, t, n_in, n_out, ids, bs = row[:6]
        out: Any = {inner: n_out}
        for key in reversed(outer):
            out = {key: out}
        return {
            id_key: rid,
            time_key: t,
            tokens_key: _tokens(ids, n_in, bs, options),
            **out,
        }

    return write


def _lmcache(i, row, ctx, options) -> dict:
    rid, t, n_in, _, ids, bs = row[:6]
    return {
        "request_id": rid,
        "timestamp": t,
        "chunk_size": bs,
        "num_tokens": n_in,
        "chunk_hashes": ids,
    }


#: format -> ``(row index, row, shared context, options) -> JSON record``.
JSONL_WRITERS = {
    "mooncake": _mooncake,
    "bailian": _bailian,
    "tokens": _token_writer("request_id", "timestamp", "tokens", "output_length"),
    "vllm": _token_writer("request_id", "arrival_time", "prompt_token_ids", "output_tokens"),
    "sglang": _token_writer("rid", "timestamp", "input_ids", "sampling_params.max_new_tokens"),
    "lmcache": _lmcache,
}
#: Writer options each format accepts.
WRITER_OPTIONS = {
    "tokens": {"vocab_size"},
    "vllm": {"vocab_size"},
    "sglang": {"vocab_size"},
    "burstgpt": {"model", "log_type"},
}


def write_jsonl(table: Any, path: Path, fmt: str, options: dict) -> Path:
    """Write ``table`` as the JSONL format ``fmt`` (one of :data:`JSONL_WRITERS`)."""
    has_sessions = all(c in table.columns for c in SESSION_COLUMNS)
    cols = list(BASE_COLUMNS) + (list(SESSION_COLUMNS) if has_sessions else [])
    make = JSONL_WRITERS[fmt]
    ctx: dict = {}
    with path.open("w", encoding="utf-8", newline="") as fh:
        for i, row in enumerate(table.select(cols).iter_rows()):
            fh.write(json.dumps(make(i, row, ctx, options), separators=(", ", ": ")) + "\n")
    return path


def write_burstgpt(table: Any, path: Path, options: dict) -> Path:
    """Write lengths and times as a BurstGPT CSV (options ``model``, ``log_type``)."""
    model = options.get("model", "synthetic")
    log_type = options.get("log_type", "Conversation log")
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n")
        rows = table.select("arrival_s", "input_length", "output_length").iter_rows()
        for t, n_in, n_out in rows:
            fh.write(f"{t!r},{model},{n_in},{n_out},{n_in + n_out},{log_type}\n")
    return path
