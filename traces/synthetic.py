"""Seeded synthetic prefix structure: generators, and the model behind length-only traces.

Block ids are *chained*: an id stands for its block and every block before it,
so two requests share id ``j`` exactly when their first ``j + 1`` blocks hold the
same tokens. Ids are small non-negative integers handed out in order of first
use (like Mooncake's), so the same seed and the same inputs give the same table
in every process. A request's content is built from segments::

    | system prompt k (Zipf over K) | document d (Zipf over D) | own tokens ......|
    |<------ shared by every request with the same k (and d) ->|<- unique ------>|

    turn t of a session:
    | previous turn's input + output (its whole context)        | new tokens .....|

* Only blocks lying wholly inside a shared segment are shared: a block that
  straddles the end of the shared part mixes in the request's own tokens and
  gets a fresh id.
* The context carried into the next turn ends with the previous turn's *output*;
  the blocks holding output tokens get fresh ids when the turn ends (a prompt
  cache never saw them), so turn t+1 starts with the previous turn's full input
  blocks followed by those output blocks.
* ``len(block_hashes) == ceil(input_length / block_size)``: the last id covers the
  partial tail block, which is never shared.

:class:`PrefixModel` does this for traces that carry only lengths and times
(Azure, BurstGPT): :meth:`PrefixModel.fit` is given each request's lengths.
:func:`generate_trace` draws the lengths too, so multi-turn contexts grow by
construction. :func:`ids_to_tokens` turns ids back into token ids whose
library hashes have the same sharing structure (the ``tokens`` writer uses it).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate, pairwise

from sagellm_kv_cache.errors import KVConfigError

from ._common import TraceRecord, check_block_size, records_to_frame

__all__ = ["PrefixModel", "generate_records", "generate_trace", "ids_to_tokens"]


def _check_prob(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
        raise KVConfigError(f"{name} must be a probability in [0, 1], got {v!r}")
    return float(v)


def _check_count(name: str, v: int, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise KVConfigError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _check_zipf(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise KVConfigError(f"{name} must be a Zipf exponent >= 0, got {v!r}")
    return float(v)


class _Session:
    __slots__ = ("ctx_ids", "ctx_tokens", "last_s", "sid", "turn")

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.turn = 0
        self.last_s = float("-inf")
        self.ctx_tokens = 0
        self.ctx_ids: list[int] = []


class PrefixModel:
    """Seeded model of shared prefixes for requests known only by their lengths.

    Each request either continues an open multi-turn session or starts a new one:

    1. With probability ``multi_turn_prob`` (and at least one open session) a
       session is drawn uniformly from the open ones. If its context (all
       previous input + output tokens) is shorter than the request's input (for
       :meth:`fit`) or stays within ``max_context_tokens`` (for :meth:`grow`),
       the request is its next turn: its ids start with the session's context ids.
       Otherwise the drawn session is closed and a new one starts. A drawn
       session whose last turn arrived less than ``min_think_s`` before this
       request (when arrival times are given) stays open and a new one starts.
    2. A new session draws, with probability ``system_prompt_prob``, system
       prompt ``k`` of ``num_system_prompts``, with Zipf popularity
       ``P(k) ~ 1 / (k + 1) ** system_prompt_zipf``, and then, with probability
       ``document_prob``, document ``d`` of ``num_documents`` (Zipf,
       ``document_zipf``). For :meth:`fit`, a segment is only used when the
       prompt has at least one own token after it.
    3. The rest of the input is unique.

    At most ``max_open_sessions`` sessions are open; starting one more closes a
    uniformly drawn open session. With ``multi_turn_prob == 0`` no session is
    kept and every request is turn 1 of its own session.

    Args:
        block_size: tokens per block.
        seed: seed of the model's ``random.Random`` (draws do not depend on
            ``PYTHONHASHSEED``).
        num_system_prompts: K, number of distinct system prompts.
        system_prompt_tokens: length of each system prompt in tokens.
        system_prompt_zipf: Zipf exponent of system-prompt popularity (0: uniform).
        system_prompt_prob: probability that a new session has a system prompt.
        num_documents: D, number of distinct shared documents (0: none).
        document_tokens: length of each document in tokens.
        document_zipf: Zipf exponent of document popularity.
        document_prob: probability that a new session includes a document.
        multi_turn_prob: probability that a request continues an open session.
        max_open_sessions: bound on simultaneously open sessions.
        max_context_tokens: :meth:`grow` starts a new session instead of a turn
            whose input would exceed this.
        min_think_s: least time between two turns of a session (needs the
            ``arrival_s`` argument of :meth:`fit` / :meth:`grow`).
    """

    def __init__(
        self,
        *,
        block_size: int = 16,
        seed: int = 0,
        num_system_prompts: int = 16,
        system_prompt_tokens: int = 512,
        system_prompt_zipf: float = 1.0,
        system_prompt_prob: float = 0.8,
        num_documents: int = 0,
        document_tokens: int = 2048,
        document_zipf: float = 1.0,
        document_prob: float = 0.0,
        multi_turn_prob: float = 0.0,
        max_open_sessions: int = 256,
        max_context_tokens: int = 32768,
        min_think_s: float = 0.0,
    ) -> None:
        self.block_size = check_block_size(block_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise KVConfigError(f"seed must be an int, got {seed!r}")
        self.num_system_prompts = _check_count("num_system_prompts", num_system_prompts, 0)
        self.system_prompt_tokens = _check_count("system_prompt_tokens", system_prompt_tokens, 1)
        self.system_prompt_prob = _check_prob("system_prompt_prob", system_prompt_prob)
        self.num_documents = _check_count("num_documents", num_documents, 0)
        self.document_tokens = _check_count("document_tokens", document_tokens, 1)
        self.document_prob = _check_prob("document_prob", document_prob)
        self.multi_turn_prob = _check_prob("multi_turn_prob", multi_turn_prob)
        self.max_open_sessions = _check_count("max_open_sessions", max_open_sessions, 1)
        self.max_context_tokens = _check_count("max_context_tokens", max_context_tokens, 1)
        if isinstance(min_think_s, bool) or not isinstance(min_think_s, int | float):
            raise KVConfigError(f"min_think_s must be a number of seconds, got {min_think_s!r}")
        if not 0 <= min_think_s < float("inf"):
            raise KVConfigError(f"min_think_s must be >= 0 and finite, got {min_think_s!r}")
        self.min_think_s = float(min_think_s)
        self._prompt_cdf = list(
            accumulate(
                (k + 1) ** -_check_zipf("system_prompt_zipf", system_prompt_zipf)
                for k in range(self.num_system_prompts)
            )
        )
        self._doc_cdf = list(
            accumulate(
                (d + 1) ** -_check_zipf("document_zipf", document_zipf)
                for d in range(self.num_documents)
            )
        )
        self._rng = random.Random(seed)
        self._next_id = 0
        self._shared: dict[tuple, list[int]] = {}
        self._open: list[_Session] = []
        self._num_sessions = 0

    # -- ids -------------------------------------------------------------------------------
    def _fresh(self, n: int) -> list[int]:
        start = self._next_id
        self._next_id += max(n, 0)
        return list(range(start, start + max(n, 0)))

    def _zipf(self, cdf: list[float]) -> int:
        return min(bisect_right(cdf, self._rng.random() * cdf[-1]), len(cdf) - 1)

    def _shared_ids(self, key: tuple, tokens: int) -> list[int]:
        """Full-block ids of a shared segment path such as ``("s", k, "d", d)``."""
        ids = self._shared.get(key)
        if ids is None:
            full = tokens // self.block_size
            if len(key) > 2:  # the prompt's own blocks come first, then the document's
                head = self._shared_ids(key[:2], self.system_prompt_tokens)
                ids = head + self._fresh(full - len(head))
            else:
                ids = self._fresh(full)
            self._shared[key] = ids
        return ids

    def _draw_prefix(self, budget: int | None) -> tuple[list[int], int]:
        """A new session's shared prefix: (full-block ids, tokens). ``budget``: the
        input length it must stay strictly below (None: unlimited)."""
        key: tuple = ()
        tokens = 0
        if self._prompt_cdf and self._rng.random() < self.system_prompt_prob:
            k = self._zipf(self._prompt_cdf)
            if budget is None or self.system_prompt_tokens < budget:
                key, tokens = ("s", k), self.system_prompt_tokens
        if self._doc_cdf and self._rng.random() < self.document_prob:
            d = self._zipf(self._doc_cdf)
            if budget is None or tokens + self.document_tokens < budget:
                key, tokens = key + ("d", d), tokens + self.document_tokens
        if not key:
            return [], 0
        return self._shared_ids(key, tokens), tokens

    # -- sessions --------------------------------------------------------------------------
    def _pick_session(self, arrival_s: float | None) -> tuple[int, _Session] | None:
        if self._open and self.multi_turn_prob and self._rng.random() < self.multi_turn_prob:
            i = self._rng.randrange(len(self._open))
            s = self._open[i]
            if arrival_s is not None and arrival_s < s.last_s + self.min_think_s:
                return None  # still thinking: it stays open, this request starts a session
            return i, s
        return None

    def _close(self, i: int) -> None:
        self._open[i] = self._open[-1]
        self._open.pop()

    def _new_session(self) -> _Session:
        self._num_sessions += 1
        s = _Session(f"s{self._num_sessions}")
        if self.multi_turn_prob:
            if len(self._open) >= self.max_open_sessions:
                self._close(self._rng.randrange(len(self._open)))
            self._open.append(s)
        return s

    def _finish(
        self, s: _Session, prefix: list[int], n_in: int, n_out: int, arrival_s: float | None
    ) -> tuple[list[int], str, int]:
        bs = self.block_size
        ids = prefix + self._fresh(-(-n_in // bs) - len(prefix))
        s.turn += 1
        if arrival_s is not None:
            s.last_s = arrival_s
        if self.multi_turn_prob:
            full_in = n_in // bs
            s.ctx_tokens = n_in + n_out
            s.ctx_ids = ids[:full_in] + self._fresh(s.ctx_tokens // bs - full_in)
        return ids, s.sid, s.turn

    def fit(
        self, input_length: int, output_length: int, arrival_s: float | None = None
    ) -> tuple[list[int], str, int]:
        """Block ids, session id and turn (1-based) for a request of the given lengths
        (requests must be given in arrival order)."""
        picked = self._pick_session(arrival_s)
        if picked is not None:
            i, s = picked
            if s.ctx_tokens < input_length:
                return self._finish(s, s.ctx_ids, input_length, output_length, arrival_s)
            self._close(i)
        prefix, _ = self._draw_prefix(input_length)
        s = self._new_session()
        return self._finish(s, prefix, input_length, output_length, arrival_s)

    def grow(
        self, own_tokens: int, output_length: int, arrival_s: float | None = None
    ) -> tuple[int, list[int], str, int]:
        """Like :meth:`fit` for a request adding ``own_tokens`` new tokens to its
        prefix (session context, or shared segments); returns the input length too."""
        picked = self._pick_session(arrival_s)
        if picked is not None:
            i, s = picked
            n_in = s.ctx_tokens + own_tokens
            if n_in <= self.max_context_tokens:
                return (n_in, *self._finish(s, s.ctx_ids, n_in, output_length, arrival_s))
            self._close(i)
        prefix, tokens = self._draw_prefix(None)
        n_in = tokens + own_tokens
        s = self._new_session()
        return (n_in, *self._finish(s, prefix, n_in, output_length, arrival_s))


def generate_records(
    num_requests: int | None = None,
    *,
    seed: int = 0,
    rate: float = 1.0,
    arrivals: Sequence[float] | None = None,
    block_size: int = 16,
    own_tokens_mean: float = 256.0,
    output_tokens_mean: float = 128.0,
    **model_kwargs,
):
    """Stream the :class:`TraceRecord` s of a seeded synthetic trace.

    Arrivals are Poisson at ``rate`` requests/s starting at 0 (or the given
    recorded ``arrivals``, seconds, sorted; ``num_requests`` defaults to their
    count, else 1000). Each request adds ``1 + floor(Exp(own_tokens_mean))``
    own tokens to its prefix and generates ``1 + floor(Exp(output_tokens_mean))``
    tokens; the prefix (system prompt, document, or the session's context) comes
    from a :class:`PrefixModel` built with ``block_size``, ``seed`` and
    ``model_kwargs`` (``num_system_prompts``, ``system_prompt_tokens``,
    ``system_prompt_zipf``, ``system_prompt_prob``, ``num_documents``,
    ``document_tokens``, ``document_zipf``, ``document_prob``,
    ``multi_turn_prob``, ``max_open_sessions``, ``max_context_tokens``,
    ``min_think_s``). The same
    arguments give the same table in every process.

    :func:`generate_trace` gives the table; write it with
    ``traces.write_trace(table, path, format=...)``; the ``tokens``
    format gives token-level JSONL with the same sharing structure.
    """
    if arrivals is not None:
        arrivals = [float(a) for a in arrivals]
        if any(a < 0 for a in arrivals) or any(b < a for a, b in pairwise(arrivals)):
            raise KVConfigError("arrivals must be non-negative and sorted")
        num_requests = len(arrivals) if num_requests is None else num_requests
        if num_requests > len(arrivals):
            raise KVConfigError(f"{num_requests} requests but only {len(arrivals)} arrivals")
    elif not (isinstance(rate, int | float) and rate > 0):
        raise KVConfigError(f"rate must be > 0 requests/s, got {rate!r}")
    num_requests = _check_count("num_requests", 1000 if num_requests is None else num_requests, 0)
    for name, v in (
        ("own_tokens_mean", own_tokens_mean),
        ("output_tokens_mean", output_tokens_mean),
    ):
        if not (isinstance(v, int | float) and v >= 1):
            raise KVConfigError(f"{name} must be >= 1, got {v!r}")
    model = PrefixModel(block_size=block_size, seed=seed, **model_kwargs)
    # Separate streams: arrivals and lengths do not shift when model options change.
    rng = random.Random(f"sagellm-kv-cache/synthetic/{seed}")
    t = 0.0
    for i in range(num_requests):
        if arrivals is not None:
            t = arrivals[i]
        elif i:
            t += rng.expovariate(rate)
        own = 1 + int(rng.expovariate(1.0 / own_tokens_mean))
        n_out = 1 + int(rng.expovariate(1.0 / output_tokens_mean))
        n_in, ids, sid, turn = model.grow(own, n_out, t)
        yield TraceRecord(f"syn-{i}", t, n_in, n_out, ids, model.block_size, sid, turn)


def generate_trace(num_requests: int | None = None, **options):
    """:func:`generate_records` (same arguments) as a canonical table, with
    ``session_id`` and ``turn``."""
    return records_to_frame(generate_records(num_requests, **options), with_sessions=True)


def ids_to_tokens(
    block_hashes: Sequence[int], input_length: int, block_size: int, vocab_size: int = 32000
) -> list[int]:
    """Token ids whose blocks are a fixed function of the chained ids.

    Block ``j`` holds ``splitmix64(id_j * 2**16 + i) % vocab_size`` for ``i`` in the
    block (64-bit wrap-around; ``block_size`` <= 65536), the last block truncated
    to ``input_length``. Equal ids give equal blocks and distinct ids distinct
    blocks (up to a ~vocab**-block_size chance), so the library's chained hashes
    of these tokens share exactly where the ids do.
    """
    import numpy as np

    if block_size > 1 << 16:
        raise KVConfigError("ids_to_tokens supports block_size <= 65536")
    h = np.asarray(block_hashes, dtype=np.int64).view(np.uint64)
    z = (h[:, None] << np.uint64(16)) + np.arange(block_size, dtype=np.uint64)[None, :]
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(vocab_size)).astype(np.int64).ravel()[:input_length].tolist()
