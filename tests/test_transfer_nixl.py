"""KVTransferEngine over NIXL (UCX, one-sided READ) between processes on 127.0.0.1,
and the engine's copy paths (direct pieces, 3-D gather, run scatter) in one process.

The NIXL tests are skipped when ``nixl_cu12`` cannot import or cannot create a
UCX agent (the skip reason is the exact error). The launcher sets ``UCX_NET_DEVICES=lo``
and ``GLOO_SOCKET_IFNAME=lo`` in the ranks and ends every process it
started. To keep the file short, the happy paths and the checksum failure run
as a sequence of scenarios in one launch (one engine per rank, reconfigured
between scenarios, each with fresh pools); the killed and hung peers need
their own launches.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import torch

from sagellm_kv_cache.errors import (
    KVChecksumMismatchError,
    KVConfigError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from sagellm_kv_cache.pool import KVPool
from sagellm_kv_cache.testing.faults import inject_faults
from sagellm_kv_cache.testing.launcher import launch
from sagellm_kv_cache.transfer import KVTransferEngine
from sagellm_kv_cache.transfer.backends.nixl import nixl_unavailable_reason
from tests._transfer_harness import (
    BPB,
    BS,
    SHAPE,
    accounting,
    digest,
    error_of,
    fill,
    prompt,
    receiver_view,
)

# the spawned ranks import this module too: probe only in the pytest process
_REASON = nixl_unavailable_reason() if multiprocessing.parent_process() is None else None
needs_nixl = pytest.mark.skipif(_REASON is not None, reason=f"NIXL unusable here: {_REASON}")


pytestmark = pytest.mark.timeout(120)


# (name, num_handles, batched, chunk_bytes, direct, fault); "-split": direct
# messages of at most 2 blocks (direct_max_message_bytes = 2 x 64-byte slabs)
SCENARIOS = [
    ("one-handle-many-chunks", 1, False, 2 * BPB, False, None),
    ("three-handles-direct", 3, False, 1 << 20, True, None),
    ("batch-of-40", 40, True, 16 * BPB, False, None),
    ("batch-of-40-direct", 40, True, 1 << 20, True, None),
    ("batch-of-40-direct-split", 40, True, 1 << 20, True, None),
    ("corrupt-staged", 1, False, 2 * BPB, False, "corrupt"),
    ("corrupt-direct", 1, False, 2 * BPB, True, "corrupt"),
    ("after-failures", 2, False, 4 * BPB, False, None),
]


def rank_scenarios(ctx):
    """Rank 0 sends, rank 1 receives, one scenario after another."""
    eng = KVTransferEngine("nixl", timeout_s=20, max_retries=0)
    out = {}
    for i, (name, n, batched, chunk_bytes, direct, fault) in enumerate(SCENARIOS):
        pool = KVPool(num_blocks=320, block_size=BS, model_shape=SHAPE)
        eng.register_pool(pool)
        eng.chunk_bytes = chunk_bytes
        eng.direct_min_message_bytes = 0 if direct else 1 << 40
        eng.direct_max_message_bytes = 128 if name.endswith("-split") else 16 << 20
        inject_faults(eng, None)
        prompts = [prompt(100 * i + j) for j in range(n)]
        if ctx.rank == 0:
            handles, digests = [], []
            for j, tokens in enumerate(prompts):
                h, kv = fill(pool, tokens, seed=100 * i + j)
                handles.append(h)
                digests.append(digest(kv[:, :, :24]))
            before = accounting(pool)
            if fault == "corrupt" and not direct:
                # flip a bit of the staging buffer after the sender hashed it
                def flip_sent(stage, chunk=None, index=None, **_):
                    if stage == "chunk_sent" and index == 3:
                        chunk[5] ^= 0x04

                inject_faults(eng, flip_sent)
            err, metas = None, []
            try:
                if batched:
                    metas.append(eng.get_transfer_metadata(eng.transfer_kv_handles(handles, 0, 1)))
                else:
                    for h in handles:
                        metas.append(eng.get_transfer_metadata(eng.transfer_kv_handle(h, 0, 1)))
            except KVTransferFailedError as exc:
                err = error_of(exc)
            out[name] = {
                "digests": digests,
                "metas": metas,
                "err": err,
                "before": before,
                "after": accounting(pool),
            }
            continue
        before = accounting(pool)
        if fault == "corrupt" and direct:
            # direct mode reads straight from the sender's pool: corrupt on arrival
            def flip_received(stage, chunk=None, index=None, **_):
                if stage == "chunk_received" and index == 1:
                    chunk[3] ^= 0x10

            inject_faults(eng, flip_received)
        records = eng.serve(pool, num_transfers=1 if batched else n, idle_timeout_s=20)
        out[name] = {
            "records": [r.to_dict() for r in records],
            "before": before,
            "acct": accounting(pool),
            "view": receiver_view(pool, prompts),
        }
    eng.close()
    return out


def rank_fault(ctx, fault: str, timeout_s: float):
    """Rank 0 sends one handle of 24 blocks in 12 chunks to rank 1; ``fault`` breaks it."""
    pool = KVPool(num_blocks=128, block_size=BS, model_shape=SHAPE)
    eng = KVTransferEngine(
        "nixl", timeout_s=timeout_s, max_retries=0, chunk_bytes=2 * BPB, max_inflight=2
    )
    eng.register_pool(pool)
    tokens = prompt(7, 96)
    if ctx.rank == 0:
        h, _ = fill(pool, tokens, seed=7)
        before = accounting(pool)
        if fault == "sender_hangs":
            inject_faults(
                eng,
                lambda stage, index=None, **_: (
                    time.sleep(timeout_s + 1) if stage == "chunk_sent" and index == 2 else None
                ),
            )
        t0 = time.monotonic()
        try:
            eng.transfer_kv_handle(h, 0, 1)
            err = None
        except KVTransferFailedError as exc:
            err = error_of(exc)
        elapsed = time.monotonic() - t0
        return {"err": err, "elapsed": elapsed, "before": before, "after": accounting(pool)}
    before = accounting(pool)
    if fault == "receiver_dies":

        def die(stage, index=None, **_):
            if stage == "chunk_received" and index == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        inject_faults(eng, die)
    t0 = time.monotonic()
    try:
        eng.receive(pool, timeout_s=20)
        err = None
    except KVTransferFailedError as exc:
        err = error_of(exc)
    return {
        "err": err,
        "elapsed": time.monotonic() - t0,
        "before": before,
        "after": accounting(pool),
        "visible": pool.match_prefix(tokens)[1],
    }


def check_ok(results):
    for r in results:
        assert r.ok, f"rank {r.rank}: {r.status} {r.error}"
    return [r.value for r in results]


@pytest.fixture(scope="module")
def scenarios():
    sender, receiver = check_ok(launch(rank_scenarios, 2, timeout_s=90))
    return sender, receiver


# -- tests --------------------------------------------------------------------------
@needs_nixl
@pytest.mark.parametrize(
    "name",
    [
        "one-handle-many-chunks",
        "three-handles-direct",
        "batch-of-40",
        "batch-of-40-direct",
        "batch-of-40-direct-split",
    ],
)
def test_kv_arrives_bit_exact_and_hits_the_receivers_prefix_cache(scenarios, name):
    sender, receiver = scenarios[0][name], scenarios[1][name]
    n = len(sender["digests"])
    assert sender["err"] is None
    assert [r["status"] for r in receiver["records"]] == ["completed"] * len(receiver["records"])
    # each prompt's 6 full blocks (24 tokens) hit on the receiver, with the sender's bytes
    assert [v["hit"] for v in receiver["view"]] == [24] * n
    assert [v["kv"] for v in receiver["view"]] == sender["digests"]
    # receiver: blocks cached and evictable, nothing held; sender: unchanged
    assert receiver["acct"] == {
        "free_blocks": 320 - 6 * n,
        "used_blocks": 0,
        "cached_blocks": 6 * n,
        "num_handles": 0,
    }
    assert sender["after"] == sender["before"]
    assert sum(m["payload_nbytes"] for m in sender["metas"]) == n * 7 * BPB
    assert all(m["status"] == "completed" for m in sender["metas"])


@needs_nixl
def test_many_block_batch_is_one_transfer_of_all_segments(scenarios):
    sender, receiver = scenarios[0]["batch-of-40"], scenarios[1]["batch-of-40"]
    (meta,) = sender["metas"]
    assert (meta["num_segments"], meta["num_blocks"]) == (40, 280)
    (rec,) = receiver["records"]
    assert (rec["num_segments"], rec["num_blocks"], rec["status"]) == (40, 280, "completed")
    assert len(rec["dst_handle_ids"]) == 40


@needs_nixl
@pytest.mark.parametrize("name", ["corrupt-staged", "corrupt-direct"])
def test_corrupted_payload_is_detected_and_nothing_is_visible(scenarios, name):
    sender, receiver = scenarios[0][name], scenarios[1][name]
    assert sender["err"]["type"] == "KVChecksumMismatchError"
    assert sender["err"]["code"] == KVChecksumMismatchError.code
    assert [r["error_code"] for r in receiver["records"]] == [KVChecksumMismatchError.code]
    assert receiver["acct"] == receiver["before"]  # all blocks free again
    assert [v["hit"] for v in receiver["view"]] == [0]
    assert sender["after"] == sender["before"]


@needs_nixl
def test_transfers_after_failures_still_land(scenarios):
    sender, receiver = scenarios[0]["after-failures"], scenarios[1]["after-failures"]
    assert sender["err"] is None
    assert [v["kv"] for v in receiver["view"]] == sender["digests"]
    assert receiver["acct"]["cached_blocks"] == 12 and receiver["acct"]["used_blocks"] == 0


@needs_nixl
def test_receiver_killed_mid_transfer_gives_sender_a_typed_error_within_timeout():
    timeout_s = 2.5
    res = launch(rank_fault, 2, args=("receiver_dies", timeout_s), timeout_s=60)
    assert res[1].status == "died" and res[1].exitcode == -signal.SIGKILL
    assert res[0].ok, res[0].error
    sender = res[0].value
    assert sender["err"]["type"] in ("KVTransferFailedError", "KVTransferTimeoutError")
    assert sender["elapsed"] < timeout_s + 30  # a loose bound: the error type decides
    assert sender["after"] == sender["before"]


@needs_nixl
def test_hung_sender_mid_stream_times_out_on_the_receiver():
    timeout_s = 2.0
    sender, receiver = check_ok(
        launch(rank_fault, 2, args=("sender_hangs", timeout_s), timeout_s=60)
    )
    assert receiver["err"]["type"] == "KVTransferTimeoutError"
    assert receiver["err"]["code"] == KVTransferTimeoutError.code
    assert receiver["elapsed"] < timeout_s + 30  # a loose bound: the error type decides
    assert receiver["after"] == receiver["before"] and receiver["visible"] == 0
    # the sender wakes after its deadline and gets a typed error; its pool is unchanged
    assert sender["err"]["type"] in ("KVTransferFailedError", "KVTransferTimeoutError")
    assert sender["after"] == sender["before"]


@needs_nixl
def test_backend_without_process_group_or_store_is_a_config_error():
    with pytest.raises(KVConfigError):
        KVTransferEngine("nixl", rank=0)  # no store, no process group


@needs_nixl
def test_backend_rejects_itself_and_unknown_ranks_as_peers():
    import torch.distributed as dist

    from sagellm_kv_cache.transfer.backends.nixl import NixlBackend

    store = dist.HashStore()
    with pytest.raises(KVConfigError):
        NixlBackend(store=store, rank=2, world_size=2)
    b = NixlBackend(store=store, rank=0, world_size=2)
    try:
        for peer in (0, 2, -1):
            with pytest.raises(KVTransferFailedError):
                b.expose(peer, 1, torch.zeros(4, dtype=torch.uint8))
    finally:
        b.close()
    with pytest.raises(KVTransferFailedError):
        b.fetch(1, 1, torch.zeros(4, dtype=torch.uint8))  # closed


# -- engine copy paths, in one process (no NIXL needed) ----------------------------
def _local_engine(**kw):
    src = KVPool(num_blocks=64, block_size=BS, model_shape=SHAPE)
    dst = KVPool(num_blocks=64, block_size=BS, model_shape=SHAPE)
    eng = KVTransferEngine("inprocess", max_retries=0, **kw)
    eng.register_pool(src, 0)
    eng.register_pool(dst, 1)
    return eng, src, dst


def _fragment(pool: KVPool) -> list:
    """Hold every other of the first 8 blocks, so new allocations are not one run."""
    held = [pool.alloc(BS) for _ in range(8)]
    for h in held[::2]:
        pool.free(h)
    return held[1::2]


@pytest.mark.parametrize(
    "kw",
    [
        {"direct_min_message_bytes": 0},  # one copy per piece, hashed around the copy
        {"direct_min_message_bytes": 1 << 40, "chunk_bytes": 3 * BPB},  # staged: gather+scatter
    ],
    ids=["direct", "staged"],
)
@pytest.mark.parametrize("fragmented", [False, True], ids=["runs", "scattered"])
def test_local_copy_paths_are_bit_exact_and_cached(kw, fragmented):
    eng, src, dst = _local_engine(**kw)
    held = _fragment(dst) if fragmented else []
    hs, digests, prompts = [], [], [prompt(i, 30) for i in range(3)]
    for i, tokens in enumerate(prompts):
        h, kv = fill(src, tokens, seed=i)
        hs.append(h)
        digests.append(digest(kv[:, :, :28]))
    eng.transfer_kv_handles(hs, 0, 1)
    for h in held:
        dst.free(h)
    view = receiver_view(dst, prompts)
    assert [v["hit"] for v in view] == [28] * 3
    assert [v["kv"] for v in view] == digests
    acct = accounting(dst)
    assert (acct["used_blocks"], acct["cached_blocks"], acct["num_handles"]) == (0, 21, 0)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "staged"])
def test_local_copy_corrupted_in_flight_is_caught_and_nothing_lands(direct):
    kw = {"direct_min_message_bytes": 0} if direct else {"direct_min_message_bytes": 1 << 40}
    eng, src, dst = _local_engine(chunk_bytes=2 * BPB, **kw)  # several messages / chunks
    tokens = prompt(5, 30)
    h, _ = fill(src, tokens, seed=5)
    before_src, before_dst = accounting(src), accounting(dst)
    seen = []

    def flip(stage, chunk=None, index=None, **_):
        seen.append(index)
        if index == 1:
            chunk[0] ^= 0x01

    inject_faults(eng, flip)
    with pytest.raises(KVChecksumMismatchError):
        eng.transfer_kv_handle(h, 0, 1)
    assert seen[:2] == [0, 1]
    assert accounting(dst) == before_dst and accounting(src) == before_src
    assert dst.match_prefix(tokens)[1] == 0


def test_direct_max_message_bytes_must_be_positive():
    with pytest.raises(KVConfigError):
        KVTransferEngine("inprocess", direct_max_message_bytes=0)
