"""OpenAI-style chat JSONL, tokenised by a tokenizer the caller supplies.

One request per line, either a chat completion request or an OpenAI Batch API line::

    {"request_id": "c1", "timestamp": 0.5, "max_tokens": 64,
     "messages": [{"role": "system", "content": "You are ..."},
                  {"role": "user", "content": "Hello"}]}
    {"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [...], "max_completion_tokens": 64}}

* ``messages`` (required; in ``body`` for a Batch line): a non-empty list of
  ``{"role": str, "content": str | [{"type": "text", "text": str}, ...] | null}``
  (non-text parts are rejected: their tokens cannot be known here).
* request id: ``request_id``, else ``custom_id``, else ``id``; default
  ``"<file stem>-<line>"``; unique (as text).
* output length, the first present of: ``usage.completion_tokens`` (a response
  attached to the line), ``max_completion_tokens``, ``max_tokens``; none: 0.
* ``timestamp`` (optional, seconds): as in the token formats.

The prompt's token ids come from ``tokenizer=`` (required; there is no silent
default, since a made-up tokenisation would decide every hit ratio):

* a ``transformers`` tokenizer (anything with ``apply_chat_template``): the ids
  of ``apply_chat_template(messages, tokenize=True, add_generation_prompt=True)``;
* a string other than ``"bytes"``: ``transformers.AutoTokenizer.from_pretrained``
  of that name or path (``transformers`` is optional and imported only then);
* a callable: ``tokenizer(messages) -> list[int]``;
* ``"bytes"``: the documented deterministic fallback, only when asked for: the
  UTF-8 bytes (ids 0..255) of the messages rendered as
  ``"<|role|>\\ncontent\\n"`` each, then ``"<|assistant|>\\n"``. A later turn of
  a conversation renders as an extension of the earlier one, so prefix sharing
  between turns and shared system prompts is kept; lengths are bytes, not a
  model's tokens.

The ids are hashed as the ``tokens`` format does (:mod:`traces.tokens`). This
format is read-only: text cannot be recovered from block ids.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sagellm_kv_cache.errors import KVConfigError, KVTraceFormatError

from ._common import RequestLine, TraceRecord, bad, jsonl_reader, parse_json_object
from .engine_logs import _first_length, _sub
from .tokens import TOKENS_BLOCK_SIZE, token_hasher, token_list_field, token_record

__all__ = ["BYTES_TOKENIZER", "iter_chat_records", "render_bytes", "resolve_tokenizer"]

#: ``tokenizer=`` value selecting the deterministic byte-level fallback.
BYTES_TOKENIZER = "bytes"


def render_bytes(messages: list[dict]) -> list[int]:
    """The fallback tokenisation (module docstring): UTF-8 bytes of the rendered chat."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    return list(text.encode("utf-8"))


def resolve_tokenizer(tokenizer: Any) -> Callable[[list[dict]], Any]:
    """``messages -> token ids`` for a ``tokenizer=`` value (module docstring).

    Raises:
        KVConfigError: no tokenizer, an unusable one, or ``transformers`` missing.
    """
    if tokenizer is None:
        raise KVConfigError(
            "format 'openai-chat' needs a tokenizer: pass tokenizer= a transformers "
            "tokenizer name or path (CLI: --tokenizer NAME), a tokenizer object, a "
            "callable messages -> token ids, or 'bytes' for the deterministic byte-level "
            "fallback"
        )
    if isinstance(tokenizer, str):
        if tokenizer == BYTES_TOKENIZER:
            return render_bytes
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise KVConfigError(
                f"tokenizer {tokenizer!r} needs the optional package transformers "
                "(pip install transformers), or pass tokenizer='bytes'"
            ) from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except Exception as exc:  # OSError, ValueError, ... from the hub or the files
            raise KVConfigError(f"cannot load tokenizer {tokenizer!r}: {exc}") from None
    template = getattr(tokenizer, "apply_chat_template", None)
    if callable(template):
        return lambda messages: template(messages, tokenize=True, add_generation_prompt=True)
    if callable(tokenizer):
        return tokenizer
    raise KVConfigError(
        f"tokenizer must be a name, 'bytes', a callable or have apply_chat_template, "
        f"got {type(tokenizer).__name__}"
    )


def _messages(rec: dict, path: Path, line: int) -> list[dict]:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        what = "missing" if msgs is None else "expected a non-empty list of messages"
        raise bad(path, line, "messages", what)
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise bad(path, line, where, "expected an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(path, line, where, "only text content parts can be tokenised")
                if not isinstance(part.get("text"), str):
                    raise bad(path, line, where, "a text part needs a string 'text'")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad(path, line, where, f"content must be a string or parts, got {content!r:.40}")
        out.append({**m, "content": content})
    return out


#: Where the output length may stand, first found wins (``traces.engine_logs._first_length``).
_OUTPUT = (
    ("usage.", "completion_tokens", False),
    ("", "max_completion_tokens", False),
    ("", "max_tokens", False),
)


@jsonl_reader(TOKENS_BLOCK_SIZE)
def iter_chat_records(
    path: Path, block_size: int, max_tokens: int, *, tokenizer: Any = None, **hashing
):
    """Stream canonical :class:`TraceRecord` s of an OpenAI-style chat JSONL.

    ``iter_chat_records(path, *, block_size=16, skip_bad=False, stats=None,
    tokenizer=None, hash_fn="sha256", extra_keys=None, max_request_tokens=None)``.

    Raises:
        KVConfigError: no usable ``tokenizer`` (checked before the file is read).
    """
    encode = resolve_tokenizer(tokenizer)
    hashed = token_hasher(block_size, **hashing)
    state = RequestLine(path)

    def parse(lineno: int, raw: str) -> TraceRecord:
        rec = parse_json_object(path, lineno, raw)
        body = _sub(rec, "body", path, lineno) if "body" in rec else rec
        rid, ts = state.take(rec, lineno, ("request_id", "custom_id", "id"), ("timestamp",))
        msgs = _messages(body, path, lineno)
        usage = _sub(rec, "usage", path, lineno)
        n_out = _first_length(path, lineno, max_tokens, {"": body, "usage.": usage}, _OUTPUT)
        try:
            ids = encode(msgs)
        except KVTraceFormatError:
            raise
        except Exception as exc:  # the tokenizer's own failure, named at this line
            raise bad(
                path, lineno, "messages", f"the tokenizer failed: {type(exc).__name__}: {exc}"
            ) from None
        if hasattr(ids, "keys") and "input_ids" in ids:  # a BatchEncoding / dict
            ids = ids["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        tokens = token_list_field({"messages": ids}, "messages", path, lineno, max_tokens)
        return token_record(state, rid, ts, tokens, n_out, hashed, block_size)

    return parse
