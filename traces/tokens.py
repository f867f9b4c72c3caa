"""Token-level JSONL, hashed with the library's chained block hashing.

One request per line::

    {"request_id": "r1", "timestamp": 0.5, "tokens": [1, 2, 3, ...], "output_length": 8}

* ``tokens`` (required): the prompt's token ids, ints in int64 range, at least one.
* ``request_id`` (optional, string or int): default ``"<file stem>-<line>"``. Ids
  are compared as text (``7`` and ``"7"`` are the same id) and must be unique:
  a repeat is an error at the line of the second one.
* ``timestamp`` (optional, seconds, sorted): ``arrival_s`` is measured from the first
  record that has one; a record without one arrives with the previous record.
* ``output_length`` (optional, int >= 0): default 0.

Block ids: the full blocks are hashed exactly as
``sagellm_kv_cache.hashing.compute_block_hashes(tokens, block_size, hash_fn=...,
extra_keys=...)`` does (chained from the root for ``extra_keys``); a trailing
partial block gets ``compute_block_hash(last full block's hash, tail tokens)``, so
``len(block_hashes) == ceil(len(tokens) / block_size)`` as in every other format.
Each digest becomes an Int64 as its first 8 bytes read little-endian, signed
(:func:`digest_to_int64`): a pure function of the tokens, identical in every
process and independent of ``PYTHONHASHSEED``. Two different prefixes share an
id with probability about 2**-64 per pair.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sagellm_kv_cache.hashing import compute_block_hash, compute_block_hashes, get_hash_fn

from ._common import (
    INT64_MAX,
    INT64_MIN,
    RequestLine,
    TraceRecord,
    bad,
    check_length,
    jsonl_reader,
    length_field,
    parse_json_object,
)

__all__ = [
    "TOKENS_BLOCK_SIZE",
    "digest_to_int64",
    "hash_tokens",
    "iter_tokens_records",
    "token_list_field",
]

TOKENS_BLOCK_SIZE = 16


def digest_to_int64(digest: bytes) -> int:
    """A block hash digest as a signed Int64: its first 8 bytes, little-endian."""
    return int.from_bytes(digest[:8], "little", signed=True)


def hash_tokens(
    tokens: list[int],
    block_size: int = TOKENS_BLOCK_SIZE,
    *,
    hash_fn="sha256",
    extra_keys: Any = None,
) -> list[int]:
    """Int64 chained block ids of ``tokens``: full blocks, then the partial tail if any."""
    digests = compute_block_hashes(tokens, block_size, extra_keys=extra_keys, hash_fn=hash_fn)
    full = len(digests) * block_size
    if full < len(tokens):
        parent = digests[-1] if digests else None
        digests.append(compute_block_hash(parent, tokens[full:], hash_fn, extra_keys=extra_keys))
    return [digest_to_int64(d) for d in digests]


def token_list_field(
    rec: dict, name: str, path: Path, line: int, max_tokens: int, *, allow_empty: bool = False
) -> list[int]:
    """``rec[name]`` as a prompt: a list of int64 token ids, at most ``max_tokens`` long
    (and at least one unless ``allow_empty``)."""
    tokens = rec.get(name)
    if not isinstance(tokens, list):
        what = "missing" if tokens is None else "expected a list of integer token ids"
        raise bad(path, line, name, what)
    check_length(path, line, name, len(tokens), max_tokens)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        if tokens and all(isinstance(t, list) for t in tokens):
            raise bad(path, line, name, "a batch of prompts: write one request per line instead")
        raise bad(path, line, name, "expected a list of integer token ids")
    if not tokens:
        if allow_empty:
            return tokens
        raise bad(path, line, name, "empty prompt")
    if min(tokens) < INT64_MIN or max(tokens) > INT64_MAX:
        raise bad(path, line, name, "token ids must fit in a signed 64-bit integer")
    return tokens


def token_hasher(
    block_size: int, hash_fn: str = "sha256", extra_keys: Any = None
) -> Callable[[list[int]], list[int]]:
    """``tokens -> block ids`` (:func:`hash_tokens`) for a token-level reader; checks
    ``hash_fn`` (``KVConfigError`` for an unknown one) before any line is read."""
    fn = get_hash_fn(hash_fn)
    return lambda tokens: hash_tokens(tokens, block_size, hash_fn=fn, extra_keys=extra_keys)


def token_record(
    state: RequestLine,
    rid: str,
    ts: float | None,
    tokens: list[int],
    n_out: int,
    hashed: Callable[[list[int]], list[int]],
    block_size: int,
) -> TraceRecord:
    """The record of a token-level line whose fields all passed: hashes the prompt,
    then commits the line's id and time to ``state``."""
    ids = hashed(tokens)
    return TraceRecord(rid, state.commit(rid, ts), len(tokens), n_out, ids, block_size)


class _TokensLine(RequestLine):
    """This format's id errors (worded as they always were here)."""

    __slots__ = ()

    def bad_id(self, rid: Any) -> str:
        return f"expected a string or integer, got {rid!r}"

    def repeated(self, rid: str) -> str:
        return f"{rid!r} already appeared earlier in the file"


@jsonl_reader(TOKENS_BLOCK_SIZE)
def iter_tokens_records(path: Path, block_size: int, max_tokens: int, **hashing: Any):
    """Stream canonical :class:`TraceRecord` s (six fields) of a token-level JSONL file.

    ``iter_tokens_records(path, *, block_size=16, skip_bad=False, stats=None,
    hash_fn="sha256", extra_keys=None, max_request_tokens=None)``;
    ``max_request_tokens``: most prompt tokens (and ``output_length``) accepted
    (default ``traces._common.MAX_REQUEST_TOKENS`` or ``$SAGELLM_KV_MAX_REQUEST_TOKENS``).
    """
    hashed = token_hasher(block_size, **hashing)
    state = _TokensLine(path)

    def parse(lineno: int, raw: str) -> TraceRecord:
        rec = parse_json_object(path, lineno, raw)
        rid, ts = state.take(rec, lineno, ("request_id",), ("timestamp",))
        tokens = token_list_field(rec, "tokens", path, lineno, max_tokens)
        n_out = (
            length_field(rec, "output_length", path, lineno, 0, max_tokens)
            if "output_length" in rec
            else 0
        )
        return token_record(state, rid, ts, tokens, n_out, hashed, block_size)

    return parse
