"""RemoteKVAccessor: ``fetch`` and ``prefetch`` check their arguments alike."""

from __future__ import annotations

import pytest

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError
from sagellm_kv_cache.pooling import GlobalKVPoolManager, NodeContribution
from tests._transfer_harness import fill, make_pool, prompt

BAD = [
    ("self", {"src_rank": 1}, KVInvalidInputError),
    ("rank", {"src_rank": -1}, KVInvalidInputError),
    ("rank-type", {"src_rank": "0"}, KVInvalidTypeError),
    ("timeout", {"timeout_s": 0}, KVConfigError),
]


@pytest.mark.parametrize("method", ["fetch", "prefetch"])
@pytest.mark.parametrize(("name", "kw", "exc"), BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_are_refused_at_once_by_fetch_and_prefetch(method, name, kw, exc):
    """``prefetch`` refuses what ``fetch`` refuses, on the caller's thread,
    before any worker starts (a source that is the current rank included)."""
    a, b = make_pool(32), make_pool(32)
    mgr = GlobalKVPoolManager([NodeContribution(0, a), NodeContribution(1, b)])
    fill(a, prompt(1), seed=1)
    hashes = a.compute_block_hashes(prompt(1))
    with pytest.raises(exc) as ei:
        getattr(mgr.accessor, method)(hashes, 1, **kw)
    assert ei.value.code == exc.code
    assert mgr.accessor.get_stats()["fetches"] == 0
    assert mgr.accessor._executor is None  # nothing was submitted
    assert b.match_prefix(prompt(1))[1] == 0
