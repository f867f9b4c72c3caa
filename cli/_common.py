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


class CapacityType(click.ParamType):
    """A capacity option (``sim.capacity`` grammar): parsed now, resolved to blocks later.

    Converts to a ``sim.capacity.CapacitySpec``; the one-line error names the option.
    """

    name = "capacity"

    def convert(self, value, param, ctx):
        from sagellm_kv_cache.errors import KVConfigError
        from sim.capacity import CapacitySpec, parse_capacity

        if isinstance(value, CapacitySpec):
            return value
        try:
            return parse_capacity(str(value))
        except KVConfigError as err:
            self.fail(err.message, param, ctx)


class CapacityListType(click.ParamType):
    """Comma-separated capacities (``1%,5Mt,40GiB``) -> a list of ``CapacitySpec``.

    Args:
        allow_inf: whether ``inf`` may be listed (a sweep draws the infinite bound anyway).
    """

    name = "capacities"

    def __init__(self, allow_inf: bool = True) -> None:
        self.allow_inf = allow_inf

    def convert(self, value, param, ctx):
        from sagellm_kv_cache.errors import KVConfigError
        from sim.capacity import GRAMMAR, parse_capacity

        if isinstance(value, list):
            return value
        out = []
        for part in str(value).split(","):
            if not part.strip():
                continue
            try:
                cap = parse_capacity(part)
            except KVConfigError as err:
                self.fail(err.message, param, ctx)
            if cap.is_infinite and not self.allow_inf:
                self.fail(
                    "the infinite-capacity bound is always drawn; list finite sizes", param, ctx
                )
            out.append(cap)
        if not out:
            self.fail(f"give at least one capacity, comma-separated; forms: {GRAMMAR}", param, ctx)
        return out


class ModelShapeType(click.ParamType):
    """``--model-shape``: a preset, ``LAYERS,KV_HEADS,HEAD_DIM,DTYPE`` or a config.json path.

    Checked now (the error lists the presets); the value stays the text the user
    gave, so ``config.json`` records it as written.
    """

    name = "shape"

    def convert(self, value, param, ctx):
        from sagellm_kv_cache.errors import KVConfigError
        from sagellm_kv_cache.model_shapes import resolve_model_shape

        try:
            resolve_model_shape(value)
        except KVConfigError as err:
            self.fail(err.message, param, ctx)
        return value


def distinct_blocks_of(table: Any):
    """A lazy count of ``table``'s distinct blocks, what ``10%`` is a share of."""
    return lambda: inf_blocks(table, "sequential")


def resolve_option(spec: Any, option: str, *, block_size: int, model_shape: Any = None,
                   distinct_blocks: Any = None, what: str = ""):  # fmt: skip
    """``sim.capacity.resolve_capacity`` whose errors are one line naming ``option``."""
    from sagellm_kv_cache.errors import KVConfigError
    from sim.capacity import resolve_capacity

    try:
        return resolve_capacity(
            spec, block_size=block_size, model_shape=model_shape, distinct_blocks=distinct_blocks
        )
    except KVConfigError as err:
        raise click.BadParameter(f"{what}{err.message}", param_hint=option) from None


def require_model_shape(specs: Any, option: str, model_shape: Any) -> None:
    """Fail before any long work when a byte capacity comes without ``--model-shape``."""
    if model_shape is not None:
        return
    for s in specs:
        if getattr(s, "unit", None) == "bytes":
            raise click.BadParameter(
                f"{s} is in bytes and needs a model shape to become blocks: add --model-shape "
                "(a preset such as llama-3-8b, LAYERS,KV_HEADS,HEAD_DIM,DTYPE such as "
                "32,8,128,bf16, or a config.json)",
                param_hint=option,
            )


def parse_tiers(ctx: Any, param: Any, value: str | None) -> dict[str, Any] | None:
    """``--tiers gpu=10%,cpu=40GiB,disk=1e5`` -> ``{"gpu": CapacitySpec, ...}`` (a click callback).

    The first tier is the device (``gpu``); the others name a link of
    ``sim.tiered.LINKS`` (cpu, host, disk, nvme, ssd), each at most once; every
    capacity is in the ``--capacity`` grammar, resolved per trace by
    :func:`resolve_tiers`.
    """
    if value is None:
        return None
    from sagellm_kv_cache.errors import KVConfigError
    from sim.capacity import parse_capacity
    from sim.tiered import LINKS

    lower = tuple(LINKS)
    out: dict[str, Any] = {}
    for i, part in enumerate(value.split(",")):
        name, sep, amount = part.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise click.BadParameter(
                f"expected NAME=CAPACITY (e.g. gpu=10%,cpu=40GiB), got {part!r}",
                param_hint="--tiers",
            )
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
            out[name] = parse_capacity(amount)
        except KVConfigError as err:
            raise click.BadParameter(
                f"tier {name!r}: {err.message}", param_hint="--tiers"
            ) from None
    return out


def resolve_tiers(tiers: dict[str, Any], table: Any, *, model_shape: Any = None) -> dict[str, int]:
    """Each tier's capacity in blocks of ``table``'s block size (``inf``: all its full
    blocks, which no tier can exceed); errors name ``--tiers`` and the tier."""
    block_size = int(table["block_size"][0])
    distinct = distinct_blocks_of(table)
    out = {}
    for name, spec in tiers.items():
        cap = resolve_option(
            spec, "--tiers", block_size=block_size, model_shape=model_shape,
            distinct_blocks=distinct, what=f"tier {name!r}: ",
        )  # fmt: skip
        out[name] = cap.blocks if cap.blocks is not None else inf_blocks(table, "concurrent")
    return out


def trace_formats() -> tuple[str, ...]:
    """``--format`` choices: ``auto`` and every format the trace readers know (light:
    the readers load polars only when reading)."""
    from traces.io import FORMATS

    return ("auto", *FORMATS)


def read_table(trace: Any, fmt: str, block_size: int | None, skip_bad: bool, stats: dict,
               prefix: str = "") -> Any:  # fmt: skip
    """The canonical table of a trace that must have requests, or a one-line error
    (``prefix`` + the reader's message, which names the file and line).

    ``block_size`` goes to readers that re-hash; a format with fixed block ids
    (mooncake: 512) accepts only its own, and ``--block-size`` is blamed only
    when the file reads fine at its own size. ``stats`` receives the reader's
    counts (``skipped``).
    """
    from sagellm_kv_cache.errors import KVCacheError
    from traces import read_trace

    try:
        table = _read_at(read_trace, trace, fmt, block_size, skip_bad, stats)
    except FileNotFoundError:
        raise click.FileError(str(trace), hint="trace file not found") from None
    except KVCacheError as err:
        raise click.ClickException(f"{prefix}{err.message}") from None
    check_not_empty(table, trace, stats)
    return table


def _read_at(read_trace: Any, trace: Any, fmt: str, block_size: int | None, skip_bad: bool,
             stats: dict) -> Any:  # fmt: skip
    from sagellm_kv_cache.errors import KVCacheError

    if block_size is None:
        return read_trace(trace, fmt, skip_bad=skip_bad, stats=stats)
    try:
        table = read_trace(trace, fmt, skip_bad=skip_bad, stats=stats, block_size=block_size)
    except TypeError as err:  # a reader without re-hashing
        if "block_size" not in str(err):
            raise
        stats.clear()
        table = read_trace(trace, fmt, skip_bad=skip_bad, stats=stats)
    except KVCacheError as err:
        try:
            read_trace(trace, fmt, skip_bad=skip_bad)
        except KVCacheError:
            raise err from None
        raise click.BadParameter(
            f"{Path(trace).name} cannot be read at block size {block_size}: {err.message}",
            param_hint="--block-size",
        ) from None
    if len(table) and int(table["block_size"][0]) != block_size:
        raise click.BadParameter(
            f"{Path(trace).name} has fixed {int(table['block_size'][0])}-token blocks and "
            f"cannot be re-hashed at block size {block_size}",
            param_hint="--block-size",
        )
    return table


# Options several commands share, written once: each is a decorator taking the
# command-specific help (and default) so every command's --help still says what
# the option means for it.


def int_option(
    *decls: str, help: str, default: int | None = None, min: int | None = 1, max: int | None = None
) -> Any:
    """An integer option in ``[min, max]``; ``--help`` shows its default when it has one."""
    return click.option(
        *decls,
        type=click.IntRange(min, max),
        default=default,
        show_default=default is not None,
        help=help,
    )


def choice_option(*decls: str, choices: Any, help: str, default: str | None = None) -> Any:
    """One of ``choices``; ``--help`` shows the default when there is one."""
    return click.option(
        *decls,
        type=click.Choice(choices),
        default=default,
        show_default=default is not None,
        help=help,
    )


def out_option(default: str | None = None, help: str = "Output directory.") -> Any:
    """``--out DIR`` into ``out_dir`` (a folder path; required when no default)."""
    # click 8.3 treats an explicit default=None as a value, which would satisfy
    # required=True: pass a default only when there is one
    extra: dict[str, Any] = {"default": default, "show_default": True} if default else {}
    return click.option(
        "--out",
        "out_dir",
        required=default is None,
        type=click.Path(file_okay=False, path_type=Path),
        help=help,
        **extra,
    )


def format_option(help: str, default: str = "auto") -> Any:
    """``--format`` into ``fmt``, choices :func:`trace_formats`."""
    return click.option(
        "--format",
        "fmt",
        default=default,
        show_default=True,
        type=click.Choice(trace_formats()),
        help=help,
    )


def block_size_option(help: str) -> Any:
    """``--block-size N`` (N >= 1; default: the trace's)."""
    return click.option("--block-size", type=click.IntRange(min=1), default=None, help=help)


def skip_bad_option(help: str = "Skip and count malformed records instead of stopping.") -> Any:
    return click.option("--skip-bad", is_flag=True, help=help)


def progress_option(help: str = "Show progress bars.") -> Any:
    return click.option("--progress/--no-progress", default=True, show_default=True, help=help)


def json_option(help: str) -> Any:
    """``--json`` into ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def model_shape_option(help: str) -> Any:
    """``--model-shape``, checked now by :class:`ModelShapeType` (the value stays as given)."""
    return click.option("--model-shape", type=ModelShapeType(), default=None, help=help)


def mode_option(default: str, help: str) -> Any:
    """``--mode sequential|concurrent``."""
    return choice_option("--mode", choices=["sequential", "concurrent"], default=default, help=help)


def dpi_option(default: int, help: str) -> Any:
    """``--dpi N`` (N >= 30)."""
    return int_option("--dpi", min=30, default=default, help=help)
