"""State snapshots for the bad-input tables (tests/test_bad_input_table*.py).

A snapshot is plain data (dicts, lists, tuples, bytes) that compares with
``==``: the public stats of an object plus its structure (handles, block
states, hash map, ref and pin counts, free queue, victim order, KV bytes,
disk files). A call that rejects its input must leave it equal.

Also the row type of those tables and the runner that checks one row.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sagellm_kv_cache.errors import KVCacheError


# -- snapshots ----------------------------------------------------------------------------------
def _tensor_digest(t: Any) -> str:
    import torch

    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def snap_handle(h: Any) -> tuple:
    return (
        h.handle_id,
        h.num_tokens,
        list(h.block_ids),
        list(h.block_hashes),
        h.num_cached_tokens,
        str(h.state),
        h.pin_count,
        h.ref_count,
        dict(h.metadata),
    )


def snap_block_pool(bp: Any) -> dict:
    policy = bp.policy
    return {
        "ref_counts": list(bp.ref_counts),
        "pin_counts": list(bp.pin_counts),
        "block_hashes": list(bp.block_hashes),
        "parent_ids": list(bp.parent_ids),
        "free_queue": list(bp.free_queue),
        "cached": dict(bp.cached),
        "evictable": sorted(b for b in range(bp.num_blocks) if b in policy),
        "victim_order": list(policy.peek_victims(len(policy))) if len(policy) else [],
        "num_evictions": bp.num_evictions,
        "num_cached_total": bp.num_cached_total,
        "evictions_by_reason": dict(bp.evictions_by_reason),
    }


def snap_pool(p: Any) -> dict:
    out = {
        "stats": p.get_stats(),
        "handles": sorted(snap_handle(h) for h in p.handles),
        "blocks": snap_block_pool(p.block_pool),
    }
    if p.storage is not None:
        out["kv"] = _tensor_digest(p.storage.kv)
    return out


def snap_storage(s: Any) -> str:
    return _tensor_digest(s.kv)


def snap_prefix_cache(pc: Any) -> dict:
    out: dict[str, Any] = {"stats": pc.get_stats(), "len": len(pc)}
    if pc.pool is not None:
        out["pool"] = snap_pool(pc.pool)
    else:
        out["entries"] = pc.entries()
        out["blocks"] = snap_block_pool(pc.block_pool)
    return out


def snap_dir(directory: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, content digest) of every file but the lock, sorted."""
    d = Path(directory)
    if not d.exists():
        return []
    return sorted(
        (p.name, hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest())
        for p in d.iterdir()
        if p.is_file() and p.name != ".lock"
    )


def snap_offload(m: Any) -> dict:
    m.wait_all(10)
    tiers = []
    for t in m.tiers:
        entry = {"name": t.name, "cached": dict(t.pool.cached), "blocks": snap_block_pool(t.pool)}
        if t.disk is not None:
            entry["files"] = snap_dir(t.disk.directory)
        tiers.append(entry)
    return {
        "stats": m.get_stats(),
        "device": snap_pool(m.device),
        "tiers": tiers,
        "hits": m.hit_counts(),
    }


def snap_collector(c: Any) -> dict:
    return {
        "summary": c.get_stats_summary(),
        "rows": bytes(c._rows),
        "pending": len(c._pending),
        "blocks": list(c._block_keys),
        "requests": list(c._request_keys),
        "tiers": list(c._tier_keys),
        "evictions": (list(c._ev_block), list(c._ev_reason), list(c._ev_hash)),
    }


def snap_scheduler(b: Any) -> dict:
    m = getattr(b, "manager", b)
    return {
        "stats": m.get_stats(),
        "running": list(m.running),
        "handles": {r: snap_handle(m.get_handle(r)) for r in m.running},
        "offload": snap_offload(m.offload),
    }


# -- rows ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EntryPoint:
    """How to build a fresh object for a row and how to snapshot it.

    ``make(tmp_path)`` returns a context (any object; rows' calls receive it);
    ``snap(ctx)`` returns comparable data; ``invariants(ctx)`` asserts the
    object's own invariants (``check_invariants()``) or does nothing;
    ``close(ctx)`` releases what ``make`` opened.
    """

    name: str
    make: Callable[[Path], Any]
    snap: Callable[[Any], Any] | None = None
    invariants: Callable[[Any], None] | None = None
    close: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class Row:
    """One case: ``call(ctx)`` raises ``exc`` (a class or a tuple of acceptable
    classes: the error must be an instance and carry one of their codes), or
    succeeds when ``exc`` is None. ``match``: a regex the message must contain."""

    id: str
    ep: EntryPoint
    call: Callable[[Any], Any]
    exc: type[KVCacheError] | tuple[type[KVCacheError], ...] | None
    match: str | None = None

    @property
    def param(self):
        return pytest.param(self, id=f"{self.ep.name}-{self.id}")


def run_row(row: Row, tmp_path: Path) -> None:
    """Build, snapshot, call, check error type + code (+ message), snapshot again."""
    ep = row.ep
    ctx = ep.make(tmp_path)
    try:
        if ep.invariants is not None:
            ep.invariants(ctx)
        before = ep.snap(ctx) if ep.snap is not None else None
        if row.exc is None:
            row.call(ctx)
        else:
            classes = row.exc if isinstance(row.exc, tuple) else (row.exc,)
            with pytest.raises(KVCacheError) as info:
                row.call(ctx)
            err = info.value
            assert isinstance(err, classes), (
                f"raised {type(err).__name__} [{err.code}], expected "
                f"{' or '.join(c.__name__ for c in classes)}: {err}"
            )
            assert err.code in {c.code for c in classes}, err.code
            if row.match is not None:
                assert re.search(row.match, str(err)), f"{row.match!r} not in {str(err)!r}"
            if ep.snap is not None:
                assert ep.snap(ctx) == before, "state changed by a rejected call"
        if ep.invariants is not None:
            ep.invariants(ctx)
    finally:
        if ep.close is not None:
            ep.close(ctx)
