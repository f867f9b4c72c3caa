"""A NIXL transfer large enough to move in several groups, between two processes.

``test_transfer_nixl.py`` moves KV of a few hundred bytes: every direct-mode
transfer there is one group. Here one handle of 24 MiB goes in direct messages
of 1 MiB, which ``pipeline.group_sizes`` cuts into groups of 8, 8, 4 and 4
(doubling from a 4 MiB unit, then halving towards the end), so the receiver
hashes each landed group while the next is read. Three transfers in one launch:

- clean: every message arrives once and the KV is bit-exact on the receiver;
- a bit flipped in message 17 (the third group) as it lands: the checksum of
  the whole transfer cannot match, both sides get the typed error, nothing is
  visible on the receiver and neither pool leaks a block;
- a clean transfer after that lands bit-exact (the engine's state survived).
"""

from __future__ import annotations

import multiprocessing

import pytest

from sagellm_kv_cache.errors import KVChecksumMismatchError, KVTransferFailedError
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.storage import ModelShape
from sagellm_kv_cache.testing.faults import inject_faults
from sagellm_kv_cache.testing.launcher import launch
from sagellm_kv_cache.transfer import KVTransferEngine
from sagellm_kv_cache.transfer.backends.nixl import MAX_BATCH, nixl_unavailable_reason
from sagellm_kv_cache.transfer.pipeline import group_sizes
from tests._transfer_harness import accounting, digest, error_of, fill, prompt, receiver_view

_REASON = nixl_unavailable_reason() if multiprocessing.parent_process() is None else None
needs_nixl = pytest.mark.skipif(_REASON is not None, reason=f"NIXL unusable here: {_REASON}")

pytestmark = pytest.mark.timeout(180)

#: 32 KiB per block and per layer's K or V (16 tokens x 8 heads x 128 x 2 bytes)
SHAPE = ModelShape(num_layers=2, num_kv_heads=8, head_dim=128, dtype="float16")
BS = 16
NUM_BLOCKS = 192  # 24 MiB of KV
MESSAGE = 1 << 20
NUM_MESSAGES = NUM_BLOCKS * SHAPE.bytes_per_block(BS) // MESSAGE
#: the message that is corrupted as it lands: the first of the third group
CORRUPT = 16
RUNS = (("clean", None), ("corrupt", CORRUPT), ("after", None))


def rank_groups(ctx):
    """Rank 0 sends one handle per run, rank 1 receives it (with ``fault`` on arrival)."""
    eng = KVTransferEngine("nixl", timeout_s=30, max_retries=0)
    eng.direct_min_message_bytes = 0
    eng.direct_max_message_bytes = MESSAGE
    out = {}
    for i, (name, fault) in enumerate(RUNS):
        pool = KVPool(num_blocks=NUM_BLOCKS + 8, block_size=BS, model_shape=SHAPE)
        eng.register_pool(pool)
        inject_faults(eng, None)
        tokens = prompt(50 + i, NUM_BLOCKS * BS)
        if ctx.rank == 0:
            h, kv = fill(pool, tokens, seed=i)
            before = accounting(pool)
            err = None
            try:
                eng.transfer_kv_handle(h, 0, 1)
            except KVTransferFailedError as exc:
                err = error_of(exc)
            out[name] = {
                "digest": digest(kv),
                "err": err,
                "before": before,
                "after": accounting(pool),
            }
            continue
        seen: list[int] = []

        def on_arrival(stage, chunk=None, index=None, fault=fault, seen=seen, **_):
            if stage == "chunk_received":
                seen.append(index)
                if index == fault:
                    chunk[3] ^= 0x10

        inject_faults(eng, on_arrival)
        before = accounting(pool)
        err = None
        try:
            eng.receive(pool, timeout_s=30, keep_handles=False)
        except KVTransferFailedError as exc:
            err = error_of(exc)
        out[name] = {
            "seen": seen,
            "err": err,
            "before": before,
            "acct": accounting(pool),
            "view": receiver_view(pool, [tokens]),
        }
    eng.close()
    return out


@pytest.fixture(scope="module")
def runs():
    results = launch(rank_groups, 2, timeout_s=150)
    for r in results:
        assert r.ok, f"rank {r.rank}: {r.status} {r.error}"
    return results[0].value, results[1].value


def test_the_transfer_goes_in_four_groups():
    assert NUM_MESSAGES == 24
    assert group_sizes([MESSAGE] * NUM_MESSAGES, MAX_BATCH) == [8, 8, 4, 4]


@needs_nixl
@pytest.mark.parametrize("name", ["clean", "after"])
def test_every_group_lands_once_and_the_kv_is_bit_exact(runs, name):
    sender, receiver = runs[0][name], runs[1][name]
    assert sender["err"] is None and receiver["err"] is None
    assert sorted(receiver["seen"]) == list(range(NUM_MESSAGES))
    (view,) = receiver["view"]
    assert view["hit"] == NUM_BLOCKS * BS and view["kv"] == sender["digest"]
    assert receiver["acct"]["cached_blocks"] == NUM_BLOCKS
    assert receiver["acct"]["used_blocks"] == 0
    assert sender["after"] == sender["before"]


@needs_nixl
def test_a_message_corrupted_in_the_third_group_fails_the_transfer_and_nothing_is_visible(runs):
    sender, receiver = runs[0]["corrupt"], runs[1]["corrupt"]
    assert CORRUPT in receiver["seen"]
    for side in (sender, receiver):
        assert side["err"]["type"] == "KVChecksumMismatchError"
        assert side["err"]["code"] == KVChecksumMismatchError.code
    assert receiver["acct"] == receiver["before"]  # every block it took is free again
    assert [v["hit"] for v in receiver["view"]] == [0]
    assert sender["after"] == sender["before"]
