"""Request logs of real engines: vLLM token JSONL, SGLang request dumps, LMCache lookup logs.

All three are JSONL, one request per line, read line by line into the canonical
table (first six columns, no sessions) with the hardening every reader here
has: a malformed record is ``KVTraceFormatError("<file>:<line>: field '<f>':
...")`` (or skipped and counted with ``skip_bad=True``), a prompt or output
above the per-request maximum is rejected, a repeated request id (compared as
text) is an error at the line of the repeat, timestamps must not go back.

**vllm** (format ``"vllm"``; field names as vLLM names them; block size 16, any)::

    {"request_id": "cmpl-1", "arrival_time": 1717000000.5,
     "prompt_token_ids": [1, 2, 3, ...], "output_token_ids": [7, 8]}

* ``prompt_token_ids`` (required): the prompt's token ids, as vLLM's
  ``TokensPrompt``, ``RequestOutput.prompt_token_ids`` and its request logger
  call them. Hashed exactly as the ``tokens`` format (:mod:`traces.tokens`).
* output length, the first present of: ``output_token_ids`` (a list: what was
  generated, ``CompletionOutput.token_ids`` / the request logger's
  ``output_token_ids``), ``output_tokens`` (an int: the per-line output length of
  ``vllm bench serve --dataset-name custom``), ``max_tokens`` (an int, at the top
  level or in ``sampling_params``: ``SamplingParams.max_tokens``, an upper
  bound); none: 0.
* ``request_id`` (optional, string or int): default ``"<file stem>-<line>"``.
* ``arrival_time`` (optional, seconds; vLLM's ``RequestMetrics.arrival_time``, a
  wall-clock epoch) or ``timestamp``: ``arrival_s`` is measured from the first
  record that has one; a record without one arrives with the previous record.
* Other fields (``prompt``, ``num_cached_tokens``, ...) are ignored.
  ``vllm bench serve --save-result`` writes one JSON document of per-run
  arrays (``input_lens``, ``output_lens``, ...) without token ids: it is not a
  request log and is not read here.

**sglang** (``"sglang"``; SGLang's native ``/generate`` request,
``GenerateReqInput``, one per line, optionally with its response's
``meta_info``; block size 16, any)::

    {"rid": "a1", "input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 64},
     "meta_info": {"prompt_tokens": 3, "completion_tokens": 17}, "timestamp": 0.25}

* ``input_ids`` (required): one prompt's token ids (a batch, a list of lists,
  is rejected: one request per line).
* output length, the first present of: ``meta_info.completion_tokens`` (what was
  generated), ``len(output_ids)``, ``sampling_params.max_new_tokens``; none: 0.
* ``meta_info.prompt_tokens``, when present, must equal ``len(input_ids)``.
* ``rid`` (optional): the request id, default ``"<file stem>-<line>"``.
* ``timestamp`` (optional, seconds): not a ``GenerateReqInput`` field; whatever
  wrote the dump adds it. SGLang's own ``--crash-dump-folder`` /
  request-dump files are pickles, which are never loaded here (nothing read
  from a trace is unpickled): dump to JSONL in this shape instead.

**lmcache** (``"lmcache"``; one ``lookup`` per line, named after LMCache's
chunked token database: ``chunk_size`` tokens per chunk (default 256), each
chunk keyed by a prefix-chained ``chunk_hash``)::

    {"request_id": "r1", "timestamp": 3.5, "chunk_size": 256, "num_tokens": 600,
     "chunk_hashes": [11, -7, 42], "hit_tokens": 512}

* ``num_tokens`` (required): tokens looked up (the prompt) -> ``input_length``.
* ``chunk_hashes`` (required): ``ceil(num_tokens / chunk_size)`` ids (the last
  chunk may be partial) -> ``block_hashes``. Each is an int (one in
  ``[2**63, 2**64)`` wraps to its signed value; a bijection) or a hex string,
  optionally a whole ``CacheEngineKey`` string ``"fmt@model@ws@worker@<hex>"``
  (its part after the last ``@``), whose low 64 bits are kept.
* ``chunk_size`` (optional): must be the same on every line; the block size.
  ``block_size=`` must agree with it; without either, 256.
* ``hit_tokens`` (optional): checked to be in ``[0, num_tokens]``, not kept (the
  replay decides hits). ``request_id``, ``timestamp``: as in vllm.
* ``output_length`` is 0: a lookup does not know what the request generated.

The vllm and sglang writers (:mod:`traces.writers`) write token ids made from
the block ids, so reading them back gives the same table up to a renaming of
block ids; the lmcache writer keeps ids as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sagellm_kv_cache.errors import KVTraceFormatError

from ._common import (
    INT64_MAX,
    RequestLine,
    TraceRecord,
    bad,
    check_block_size,
    guarded,
    init_stats,
    int_field,
    jsonl_items,
    jsonl_reader,
    length_field,
    parse_json_object,
    resolve_max_request_tokens,
)
from .tokens import TOKENS_BLOCK_SIZE, token_hasher, token_list_field, token_record

__all__ = [
    "LMCACHE_CHUNK_SIZE",
    "RequestLine",
    "iter_lmcache_records",
    "iter_sglang_records",
    "iter_vllm_records",
]

#: LMCache's default ``chunk_size`` (tokens per chunk).
LMCACHE_CHUNK_SIZE = 256
_U64 = 1 << 64


def _sub(rec: dict, name: str, path: Path, line: int) -> dict:
    v = rec.get(name, {})
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad(path, line, name, f"expected an object, got {type(v).__name__}")
    return v


def _first_length(
    path: Path,
    line: int,
    max_tokens: int,
    objects: dict[str, dict],
    sources: tuple[tuple[str, str, bool], ...],
) -> int:
    """The output length at the first present of ``sources``, each ``(prefix, key,
    is_a_list)``: ``objects[prefix][key]``, named ``prefix + key`` in errors (a list
    counts its items); 0 when none is present."""
    for prefix, key, is_list in sources:
        rec, field = objects[prefix], prefix + key
        if key not in rec or rec[key] is None:
            continue
        if is_list:
            ids = token_list_field(rec, key, path, line, max_tokens, allow_empty=True)
            return len(ids)
        try:
            return length_field(rec, key, path, line, 0, max_tokens)
        except KVTraceFormatError as err:  # name the nested field in full
            raise bad(path, line, field, err.message.split(": ", 2)[-1]) from None
    return 0


#: Where each format's output length may stand, first found wins (see :func:`_first_length`).
_VLLM_OUTPUT = (
    ("", "output_token_ids", True),
    ("", "output_tokens", False),
    ("", "max_tokens", False),
    ("sampling_params.", "max_tokens", False),
)
_SGLANG_OUTPUT = (
    ("meta_info.", "completion_tokens", False),
    ("", "output_ids", True),
    ("sampling_params.", "max_new_tokens", False),
)


@jsonl_reader(TOKENS_BLOCK_SIZE)
def iter_vllm_records(path: Path, block_size: int, max_tokens: int, **hashing: Any):
    """Stream canonical :class:`TraceRecord` s of a vLLM token JSONL (module docstring).

    ``iter_vllm_records(path, *, block_size=16, skip_bad=False, stats=None,
    hash_fn="sha256", extra_keys=None, max_request_tokens=None)``
    """
    hashed = token_hasher(block_size, **hashing)
    state = RequestLine(path)

    def parse(lineno: int, raw: str) -> TraceRecord:
        rec = parse_json_object(path, lineno, raw)
        rid, ts = state.take(rec, lineno, ("request_id",), ("arrival_time", "timestamp"))
        tokens = token_list_field(rec, "prompt_token_ids", path, lineno, max_tokens)
        params = _sub(rec, "sampling_params", path, lineno)
        n_out = _first_length(
            path, lineno, max_tokens, {"": rec, "sampling_params.": params}, _VLLM_OUTPUT
        )
        return token_record(state, rid, ts, tokens, n_out, hashed, block_size)

    return parse


@jsonl_reader(TOKENS_BLOCK_SIZE)
def iter_sglang_records(path: Path, block_size: int, max_tokens: int, **hashing: Any):
    """Stream canonical :class:`TraceRecord` s of an SGLang request dump (module docstring).

    Called as :func:`iter_vllm_records` is.
    """
    hashed = token_hasher(block_size, **hashing)
    state = RequestLine(path)

    def parse(lineno: int, raw: str) -> TraceRecord:
        rec = parse_json_object(path, lineno, raw)
        if isinstance(rec.get("rid"), list):
            raise bad(path, lineno, "rid", "a batch of requests: write one request per line")
        rid, ts = state.take(rec, lineno, ("rid",), ("timestamp",))
        tokens = token_list_field(rec, "input_ids", path, lineno, max_tokens)
        meta = _sub(rec, "meta_info", path, lineno)
        params = _sub(rec, "sampling_params", path, lineno)
        if meta.get("prompt_tokens") is not None:
            n = int_field(meta, "prompt_tokens", path, lineno, 0)
            if n != len(tokens):
                raise bad(
                    path,
                    lineno,
                    "meta_info.prompt_tokens",
                    f"{n} differs from the {len(tokens)} input_ids",
                )
        objects = {"": rec, "meta_info.": meta, "sampling_params.": params}
        n_out = _first_length(path, lineno, max_tokens, objects, _SGLANG_OUTPUT)
        return token_record(state, rid, ts, tokens, n_out, hashed, block_size)

    return parse


def _chunk_hash(h: Any, path: Path, line: int) -> int:
    if isinstance(h, bool):
        raise bad(path, line, "chunk_hashes", "expected integers or hex strings, got a bool")
    if isinstance(h, int):
        if not -(1 << 63) <= h < _U64:
            raise bad(path, line, "chunk_hashes", "an integer hash must fit in 64 bits")
        return h - _U64 if h > INT64_MAX else h
    if isinstance(h, str):
        text = h.rsplit("@", 1)[-1]
        if not 0 < len(text) <= 128:
            raise bad(path, line, "chunk_hashes", f"not a hex hash: {h[:40]!r}")
        try:
            v = int(text, 16) % _U64
        except ValueError:
            raise bad(path, line, "chunk_hashes", f"not a hex hash: {h[:40]!r}") from None
        return v - _U64 if v > INT64_MAX else v
    raise bad(
        path, line, "chunk_hashes", f"expected integers or hex strings, got {type(h).__name__}"
    )


def iter_lmcache_records(
    path: str | Path,
    *,
    block_size: int | None = None,
    skip_bad: bool = False,
    stats: dict | None = None,
    max_request_tokens: int | None = None,
) -> Iterator[TraceRecord]:
    """Stream canonical :class:`TraceRecord` s of an LMCache lookup log (module docstring).

    ``block_size``: None takes the file's ``chunk_size`` (else 256); a given one
    must equal every line's ``chunk_size`` (a line that differs is an error there).
    """
    path = Path(path)
    given = None if block_size is None else check_block_size(block_size)
    max_tokens = resolve_max_request_tokens(max_request_tokens)
    stats = init_stats(stats)
    state = RequestLine(path)
    chunk: list[int | None] = [given]

    def parse(lineno: int, raw: str) -> TraceRecord:
        rec = parse_json_object(path, lineno, raw)
        rid, ts = state.take(rec, lineno, ("request_id",), ("timestamp",))
        size = chunk[0]
        if "chunk_size" in rec:
            cs = int_field(rec, "chunk_size", path, lineno, 1)
            if size is None:
                size = cs
            elif cs != size:
                what = f"block_size={given}" if given is not None else f"{size} before it"
                raise bad(path, lineno, "chunk_size", f"{cs} differs from {what}")
        size = size or LMCACHE_CHUNK_SIZE
        n_in = length_field(rec, "num_tokens", path, lineno, 1, max_tokens)
        hashes = rec.get("chunk_hashes")
        if not isinstance(hashes, list):
            raise bad(path, lineno, "chunk_hashes", "missing" if hashes is None else "not a list")
        expected = -(-n_in // size)
        if len(hashes) != expected:
            raise bad(
                path,
                lineno,
                "chunk_hashes",
                f"expected {expected} hashes for num_tokens {n_in} at chunk_size {size}, "
                f"got {len(hashes)}",
            )
        ids = [_chunk_hash(h, path, lineno) for h in hashes]
        if rec.get("hit_tokens") is not None:
            int_field(rec, "hit_tokens", path, lineno, 0, n_in)
        chunk[0] = size
        t = state.commit(rid, ts)
        return TraceRecord(rid, t, n_in, 0, ids, size)

    yield from guarded(jsonl_items(path), parse, skip_bad, stats)
