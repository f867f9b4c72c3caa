"""Checks the commands share: output folders, tables, capacities, tiers.

Each raises a ``click`` error whose one line names the option (or the file), so
an ordinary mistake never ends in a traceback, and each runs before any long
work: an unwritable ``--out`` is reported before the replay, not after it.

Capacities larger than a trace can use are clamped, never allocated: a pool
with at least as many blocks as the trace has (distinct block ids for a
sequential replay, all full blocks of all requests for a concurrent or tiered
one) never evicts, so it gives exactly the result of an infinite capacity.
Capacities up to :data:`CLAMP_ABOVE_BLOCKS` are cheap to build and are kept as
given (so a curve keeps its x values); larger ones that the trace cannot use
are clamped to what it can, with a note, and the resolved config records the
clamped value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

#: Capacities (blocks) at most this large are built as given even when the trace
#: cannot fill them (a pool of 2**20 blocks takes tens of MB); see the module doc.
CLAMP_ABOVE_BLOCKS = 1 << 20
#: Device tier name ``--tiers`` accepts first; the lower tiers are ``sim.tiered.LINKS``.
DEVICE_TIERS = ("gpu",)


def check_out_dir(out_dir: Path, option: str = "--out") -> None:
    """Fail now if ``out_dir`` cannot be created or written (nothing is created here)."""
    path = Path(out_dir)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise click.BadParameter(
            f"{path}: cannot create a folder there ({probe} is not a folder)", param_hint=option
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{path}: {probe} is not writable", param_hint=option)


def check_not_empty(table: Any, trace: Any, stats: dict | None = None) -> None:
    """An empty trace has no hit ratio to report: a one-line error, not zeros."""
    if len(table):
        return
    skipped = (stats or {}).get("skipped", 0)
    why = f" ({skipped} malformed records skipped)" if skipped else ""
    raise click.ClickException(f"{trace}: the trace has no requests to replay{why}")


def inf_blocks(table: Any, mode: str = "sequential") -> int:
    """Blocks a replay of ``table`` can ever use; any capacity at or above it never
    evicts (the value ``sim`` itself uses for an infinite capacity)."""
    import polars as pl

    if not len(table):
        return 1
    if mode == "sequential":
        n = table["block_hashes"].explode().drop_nulls().n_unique()
    else:
        n = int(table.select((pl.col("input_length") // pl.col("block_size")).sum()).item())
    return max(1, int(n))


def clamp_capacity(blocks: int | None, limit: int) -> int | None:
    """``blocks`` capped at ``limit`` when it is above :data:`CLAMP_ABOVE_BLOCKS` too
    (the result is the same; see the module docstring)."""
    if blocks is None or blocks <= CLAMP_ABOVE_BLOCKS:
        return blocks
    return min(blocks, limit)


def parse_tiers(ctx: Any, param: Any, value: str | None) -> dict[str, int] | None:
    """``--tiers gpu=2000,cpu=8000,disk=1e5`` -> ``{"gpu": 2000, ...}`` (a click callback).

    The first tier is the device (``gpu``); the others name a link of
    ``sim.tiered.LINKS`` (cpu, host, disk, nvme, ssd), each at most once; every
    capacity is a positive whole number of blocks.
    """
    if value is None:
        return None
    from sagellm_kv_cache.errors import KVConfigError
    from sim.config import parse_capacity
    from sim.tiered import LINKS

    lower = tuple(LINKS)
    out: dict[str, int] = {}
    for i, part in enumerate(value.split(",")):
        name, sep, amount = part.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=BLOCKS, got {part!r}", param_hint="--tiers")
        valid = DEVICE_TIERS if i == 0 else lower
        if name not in valid:
            where = "the first (device) tier" if i == 0 else "a lower tier"
            raise click.BadParameter(
                f"unknown tier {name!r} as {where}; valid: {', '.join(valid)}",
                param_hint="--tiers",
            )
        if name in out:
            raise click.BadParameter(f"tier {name!r} is given twice", param_hint="--tiers")
        try:
            cap = parse_capacity(amount)
        except KVConfigError as err:
            raise click.BadParameter(
                f"tier {name!r}: {err.message}", param_hint="--tiers"
            ) from None
        if cap.unit != "blocks":
            raise click.BadParameter(
                f"tier {name!r}: give a block count, got {amount.strip()!r}", param_hint="--tiers"
            )
        out[name] = int(cap.amount)
    return out
