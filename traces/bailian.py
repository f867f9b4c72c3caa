"""Qwen-Bailian JSONL (Alibaba's "KVCache in the wild" traces), 16-token blocks.

One request per line::

    {"chat_id": 7, "parent_chat_id": 3, "timestamp": 12.5, "input_length": 900,
     "output_length": 64, "type": "text", "turn": 2, "hash_ids": [...]}

* ``chat_id``: the request's id (int or string), unique in the file -> ``request_id``.
  Ids are compared as text, so ``7`` and ``"7"`` are the same id (both become
  ``request_id`` ``"7"``): a repeat is an error at the line of the second one.
* ``parent_chat_id``: the previous request of the same conversation, ``-1`` (or ``"-1"``)
  for none.
  ``session_id`` is the root of the parent chain (the first request's chat_id).
  A parent that is not in the file (a slice of a larger trace) is taken as the root.
* ``timestamp``: seconds; ``arrival_s`` is measured from the first record's.
* ``turn``: the turn in the conversation (int >= 0), kept as ``turn``.
* ``type``: request type (e.g. ``"text"``, ``"search"``), optional, must be a string;
  it is validated, not kept.
* ``hash_ids``: chained block ids, ``ceil(input_length / 16)`` of them.

The chat_id -> session map grows by one small entry per request (a trace of
tens of millions of requests still streams in bounded-per-row memory).
"""

from __future__ import annotations

from pathlib import Path

from ._common import (
    INT64_MAX,
    TraceRecord,
    bad,
    check_sorted,
    hash_list_field,
    int_field,
    jsonl_reader,
    length_field,
    number_field,
    parse_json_object,
)
from .fastjson import BailianLine, decode_line, ids_ok, timestamp_ok

__all__ = ["BAILIAN_BLOCK_SIZE", "iter_bailian_records"]

BAILIAN_BLOCK_SIZE = 16


def _id_field(rec: dict, name: str, path: Path, line: int) -> int | str:
    if name not in rec:
        raise bad(path, line, name, "missing")
    v = rec[name]
    if isinstance(v, bool) or not isinstance(v, int | str) or v == "":
        raise bad(path, line, name, f"expected an integer or non-empty string id, got {v!r}")
    return v


@jsonl_reader(BAILIAN_BLOCK_SIZE)
def iter_bailian_records(path: Path, block_size: int, max_tokens: int):
    """Stream canonical :class:`TraceRecord` s (with ``session_id`` and ``turn``).

    Called as :func:`traces.mooncake.iter_mooncake_records` is, with ``block_size=16``.
    """
    root_of: dict[str, str] = {}  # chat id (as text) -> its session's root chat id
    state: dict = {"last_ts": None, "t0": None}

    def parse(lineno: int, raw: str) -> TraceRecord:
        f = decode_line(raw, BailianLine)
        if f is not None:
            chat, parent, ts, n_in = (
                str(f.chat_id),
                str(f.parent_chat_id),
                f.timestamp,
                f.input_length,
            )
            if (
                chat not in root_of
                and chat != ""
                and parent != ""
                and parent != chat
                and timestamp_ok(ts, state["last_ts"])
                and 1 <= n_in <= max_tokens
                and 0 <= f.output_length <= max_tokens
                and 0 <= f.turn <= INT64_MAX
                and ids_ok(f.hash_ids, n_in, block_size)
            ):
                return accept(chat, parent, ts, n_in, f.output_length, f.turn, f.hash_ids)
        return parse_fields(lineno, raw)  # the reference: names the bad field

    def accept(chat, parent, ts, n_in, n_out, turn, ids) -> TraceRecord:
        root = chat if parent == "-1" else root_of.get(parent, parent)
        root_of[chat] = root
        state["last_ts"] = ts
        if state["t0"] is None:
            state["t0"] = ts
        return TraceRecord(chat, float(ts - state["t0"]), n_in, n_out, ids, block_size, root, turn)

    def parse_fields(lineno: int, raw: str) -> TraceRecord:
        rec = parse_json_object(path, lineno, raw)
        chat = str(_id_field(rec, "chat_id", path, lineno))
        if chat in root_of:
            raise bad(path, lineno, "chat_id", f"{chat!r} already appeared earlier in the file")
        parent = str(_id_field(rec, "parent_chat_id", path, lineno))
        if parent == chat:
            raise bad(path, lineno, "parent_chat_id", "a request cannot be its own parent")
        ts = number_field(rec, "timestamp", path, lineno)
        check_sorted(path, lineno, "timestamp", ts, state["last_ts"])
        n_in = length_field(rec, "input_length", path, lineno, 1, max_tokens)
        n_out = length_field(rec, "output_length", path, lineno, 0, max_tokens)
        if "type" in rec and not isinstance(rec["type"], str):
            raise bad(path, lineno, "type", f"expected a string, got {rec['type']!r}")
        turn = int_field(rec, "turn", path, lineno, 0)
        ids = hash_list_field(rec, "hash_ids", path, lineno, n_in, block_size)
        return accept(chat, parent, ts, n_in, n_out, turn, ids)

    return parse
