"""KVTransferEngine across processes on 127.0.0.1 with torch.distributed (gloo).

Each test starts its ranks with ``sagellm_kv_cache.testing.launcher.launch`` (which kills
whatever is still running when it returns); the rank functions below run in
the spawned processes and return small dicts the test asserts on.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from sagellm_kv_cache.errors import (
    KVChecksumMismatchError,
    KVTransferFailedError,
    KVTransferTimeoutError,
)
from sagellm_kv_cache.testing.faults import inject_faults
from sagellm_kv_cache.testing.launcher import launch
from sagellm_kv_cache.transfer import KVTransferEngine
from tests._transfer_harness import (
    BPB,
    accounting,
    digest,
    fill,
    make_pool,
    prompt,
    receiver_view,
)

pytestmark = pytest.mark.timeout(120)


# -- rank functions (run in spawned processes) -------------------------------------
def rank_roundtrip(ctx, num_handles: int, batched: bool, chunk_bytes: int, direct: bool = False):
    pool = make_pool(320)
    kw = {"direct_min_message_bytes": 0} if direct else {}
    eng = KVTransferEngine("torch", timeout_s=20, chunk_bytes=chunk_bytes, **kw)
    eng.register_pool(pool)
    prompts = [prompt(i) for i in range(num_handles)]
    if ctx.rank == 0:
        handles, digests = [], []
        for i, tokens in enumerate(prompts):
            h, kv = fill(pool, tokens, seed=i)
            handles.append(h)
            digests.append(digest(kv[:, :, :24]))
        if batched:
            tids = [eng.transfer_kv_handles(handles, 0, 1)]
        else:
            tids = [eng.transfer_kv_handle(h, 0, 1) for h in handles]
        metas = [eng.get_transfer_metadata(t) for t in tids]
        return {"digests": digests, "metas": metas, "acct": accounting(pool)}
    records = eng.serve(pool, num_transfers=1 if batched else num_handles, idle_timeout_s=20)
    acct = accounting(pool)
    return {
        "records": [r.to_dict() for r in records],
        "acct": acct,
        "view": receiver_view(pool, prompts),
        "host_message_bytes": eng.backend.host_message_bytes,
    }


def rank_concurrent(ctx, per_sender: int):
    """Ranks 1.. send ``per_sender`` handles each to rank 0, all at once (async)."""
    pool = make_pool(256)
    eng = KVTransferEngine("torch", timeout_s=20, chunk_bytes=2 * BPB, max_inflight=2)
    eng.register_pool(pool)
    senders = list(range(1, ctx.world_size))
    all_prompts = {r: [prompt(r * 100 + i) for i in range(per_sender)] for r in senders}
    if ctx.rank != 0:
        futs, digests = [], []
        for i, tokens in enumerate(all_prompts[ctx.rank]):
            h, kv = fill(pool, tokens, seed=ctx.rank * 100 + i)
            digests.append(digest(kv[:, :, :24]))
            futs.append(eng.transfer_kv_handle_async(h, ctx.rank, 0))
        tids = [f.result(timeout=60) for f in futs]
        eng.close()
        return {"digests": digests, "tids": tids}
    records = eng.serve(pool, num_transfers=per_sender * len(senders), idle_timeout_s=20)
    return {
        "statuses": [r.status.value for r in records],
        "srcs": sorted(r.src_rank for r in records),
        "acct": accounting(pool),
        "view": {r: receiver_view(pool, all_prompts[r]) for r in senders},
    }


def rank_fault(ctx, fault: str, timeout_s: float, direct: bool = False):
    """Rank 0 sends one handle (many chunks) to rank 1; ``fault`` breaks it."""
    pool = make_pool(128)
    kw = {"direct_min_message_bytes": 0} if direct else {}
    eng = KVTransferEngine(
        "torch", timeout_s=timeout_s, max_retries=0, chunk_bytes=2 * BPB, max_inflight=2, **kw
    )
    eng.register_pool(pool)
    tokens = prompt(7, 96)  # 24 blocks -> 12 chunks
    if ctx.rank == 0:
        h, _ = fill(pool, tokens, seed=7)
        before = accounting(pool)
        if fault == "corrupt" and not direct:  # flip a bit after the sender hashed it
            inject_faults(
                eng,
                lambda stage, chunk=None, index=None, **_: (
                    chunk.__setitem__(3, chunk[3] ^ 0x10) if index == 5 else None
                ),
            )
        elif fault == "sender_hangs":
            inject_faults(
                eng,
                lambda stage, index=None, **_: time.sleep(timeout_s + 2) if index == 2 else None,
            )
        t0 = time.monotonic()
        try:
            eng.transfer_kv_handle(h, 0, 1)
            err = None
        except KVTransferFailedError as exc:
            err = {"type": type(exc).__name__, "code": exc.code, "msg": str(exc)}
        elapsed = time.monotonic() - t0
        return {"err": err, "elapsed": elapsed, "before": before, "after": accounting(pool)}
    before = accounting(pool)
    if fault == "receiver_dies":

        def die(stage, index=None, **_):
            if stage == "chunk_received" and index == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        inject_faults(eng, die)
    elif fault == "corrupt" and direct:
        # direct mode sends from the pool's own memory, so flip the bit on arrival
        # (before the receiver hashes it), as a bad link would
        def flip(stage, chunk=None, index=None, **_):
            if stage == "chunk_received" and index == 1:  # of 4 messages
                chunk[3] ^= 0x10

        inject_faults(eng, flip)
    elif fault == "receiver_hangs":
        inject_faults(
            eng, lambda stage, **_: time.sleep(timeout_s + 2) if stage == "ready" else None
        )
    try:
        eng.receive(pool, timeout_s=20)
        err = None
    except KVTransferFailedError as exc:
        err = {"type": type(exc).__name__, "code": exc.code, "msg": str(exc)}
    return {
        "err": err,
        "before": before,
        "after": accounting(pool),
        "visible": pool.match_prefix(tokens)[1],
    }


def rank_retry_after_corruption(ctx):
    pool = make_pool(64)
    eng = KVTransferEngine("torch", timeout_s=20, max_retries=1, retry_backoff_ms=5)
    eng.register_pool(pool)
    tokens = prompt(3, 32)
    if ctx.rank == 0:
        h, kv = fill(pool, tokens, seed=3)
        seen = []

        def corrupt_first_attempt(stage, chunk=None, **_):
            if stage == "chunk_sent" and not seen:
                seen.append(1)
                chunk[0] ^= 1

        inject_faults(eng, corrupt_first_attempt)
        tid = eng.transfer_kv_handle(h, 0, 1)
        return {"meta": eng.get_transfer_metadata(tid), "digest": digest(kv)}
    records = eng.serve(pool, num_transfers=2, idle_timeout_s=20)
    return {
        "codes": [r.error_code for r in records],
        "acct": accounting(pool),
        "view": receiver_view(pool, [tokens]),
    }


def check_ok(results):
    for r in results:
        assert r.ok, f"rank {r.rank}: {r.status} {r.error}"
    return [r.value for r in results]


# -- tests --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_handles", "batched", "chunk_bytes"),
    [(1, False, 2 * BPB), (3, False, 1 << 20), (40, True, 16 * BPB)],
    ids=["one-handle-many-chunks", "three-handles", "batch-of-40"],
)
def test_kv_arrives_bit_exact_and_hits_the_receivers_prefix_cache(
    num_handles, batched, chunk_bytes
):
    sender, receiver = check_ok(
        launch(rank_roundtrip, 2, args=(num_handles, batched, chunk_bytes), timeout_s=90)
    )
    assert [r["status"] for r in receiver["records"]] == ["completed"] * len(receiver["records"])
    # every prompt's 6 full blocks hit on the receiver, with the sender's bytes
    assert [v["hit"] for v in receiver["view"]] == [24] * num_handles
    assert [v["kv"] for v in receiver["view"]] == sender["digests"]
    assert receiver["host_message_bytes"] == 2 << 20  # gloo's direct-mode message size
    # receiver: blocks cached and evictable, nothing held; exact counts
    assert receiver["acct"] == {
        "free_blocks": 320 - 6 * num_handles,
        "used_blocks": 0,
        "cached_blocks": 6 * num_handles,
        "num_handles": 0,
    }
    total = sum(m["payload_nbytes"] for m in sender["metas"])
    assert total == num_handles * 7 * BPB
    assert all(m["status"] == "completed" and m["gbps"] > 0 for m in sender["metas"])
    if batched:
        assert sender["metas"][0]["num_segments"] == num_handles


def test_concurrent_transfers_from_two_senders_to_one_receiver():
    recv, s1, s2 = check_ok(launch(rank_concurrent, 3, args=(3,), timeout_s=90))
    assert recv["statuses"] == ["completed"] * 6
    assert recv["srcs"] == [1, 1, 1, 2, 2, 2]
    for rank, sent in ((1, s1), (2, s2)):
        assert [v["hit"] for v in recv["view"][rank]] == [24] * 3
        assert [v["kv"] for v in recv["view"][rank]] == sent["digests"]
        assert len(set(sent["tids"])) == 3
    assert recv["acct"]["used_blocks"] == 0 and recv["acct"]["cached_blocks"] == 36


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
def test_receiver_killed_mid_transfer_gives_sender_a_typed_error_within_timeout(direct):
    timeout_s = 8.0
    res = launch(rank_fault, 2, args=("receiver_dies", timeout_s, direct), timeout_s=60)
    assert res[1].status == "died" and res[1].exitcode == -signal.SIGKILL
    assert res[0].ok, res[0].error
    sender = res[0].value
    assert sender["err"]["type"] in ("KVTransferFailedError", "KVTransferTimeoutError")
    # the error's type decides; the bound only catches a wait on a library default
    # (gloo's 30 minutes), far above the expected ~timeout_s
    assert sender["elapsed"] < timeout_s + 30
    assert sender["after"] == sender["before"]  # the sender's handle is still its own


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
def test_corrupted_payload_is_detected_and_nothing_is_visible(direct):
    sender, receiver = check_ok(launch(rank_fault, 2, args=("corrupt", 20.0, direct), timeout_s=60))
    assert sender["err"]["type"] == "KVChecksumMismatchError"
    assert sender["err"]["code"] == KVChecksumMismatchError.code
    assert receiver["err"]["type"] == "KVChecksumMismatchError"
    assert receiver["after"] == receiver["before"]  # all blocks free again
    assert receiver["visible"] == 0
    assert sender["after"] == sender["before"]


def test_hung_receiver_times_out_and_both_pools_stay_exact():
    timeout_s = 3.0
    sender, receiver = check_ok(
        launch(rank_fault, 2, args=("receiver_hangs", timeout_s), timeout_s=60)
    )
    assert sender["err"]["type"] == "KVTransferTimeoutError"
    assert sender["err"]["code"] == KVTransferTimeoutError.code
    assert sender["elapsed"] < timeout_s + 30  # a loose bound: the error type decides
    # the receiver wakes up, sees the sender gave up, and frees what it allocated
    assert receiver["err"] is not None and "gave up" in receiver["err"]["msg"]
    assert receiver["after"] == receiver["before"] and receiver["visible"] == 0
    assert sender["after"] == sender["before"]


def test_hung_sender_mid_stream_times_out_on_the_receiver():
    timeout_s = 3.0
    sender, receiver = check_ok(
        launch(rank_fault, 2, args=("sender_hangs", timeout_s), timeout_s=60)
    )
    assert receiver["err"]["type"] == "KVTransferTimeoutError"
    assert receiver["after"] == receiver["before"] and receiver["visible"] == 0
    # the sender wakes after its deadline: its link is closed, it gets a typed error
    assert sender["err"]["type"] in ("KVTransferFailedError", "KVTransferTimeoutError")
    assert sender["after"] == sender["before"]


def test_checksum_mismatch_is_retried_and_the_retry_lands():
    sender, receiver = check_ok(launch(rank_retry_after_corruption, 2, timeout_s=60))
    assert sender["meta"]["status"] == "completed" and sender["meta"]["retries"] == 1
    assert receiver["codes"] == [KVChecksumMismatchError.code, None]
    assert receiver["view"] == [{"hit": 32, "kv": sender["digest"]}]
    assert receiver["acct"]["used_blocks"] == 0 and receiver["acct"]["cached_blocks"] == 8
