"""``convert``: read a trace in any supported format, write it in another.

Only parses options and calls ``traces`` (``read_trace`` then ``write_trace``).
"""

from __future__ import annotations

from pathlib import Path

import click

from traces.io import FORMATS as _FORMATS  # light: readers load polars only when reading
from traces.io import WRITE_FORMATS

from ._common import (
    block_size_option,
    check_out_dir,
    choice_option,
    int_option,
    skip_bad_option,
)

#: ``--from`` choices: "auto" and every format the readers know; ``--to``: the writers'.
READ_FORMATS = ("auto", *_FORMATS)


def _fail(err, in_path: Path) -> click.ClickException:
    """One line for a library error: reader errors carry ``file:line`` already;
    option mistakes name the option they come from."""
    from sagellm_kv_cache.errors import KVConfigError

    msg = err.message
    if isinstance(err, KVConfigError):
        low = msg.lower()
        for key, opt in (
            ("tokenizer", "--tokenizer"),
            ("block_size", "--block-size"),
            ("block size", "--block-size"),
            ("endpoint", "--endpoint"),
            ("max_request_tokens", "SAGELLM_KV_MAX_REQUEST_TOKENS"),
        ):
            if key in low:
                return click.BadParameter(msg, param_hint=opt)
    return click.ClickException(f"[{err.code}] {msg}")


@click.command("convert")
@click.argument("in_path", metavar="IN", type=click.Path(path_type=Path))
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@choice_option(
    "--to",
    "to_fmt",
    choices=WRITE_FORMATS,
    help="Output format (default: parquet for a .parquet OUT; required otherwise).",
)
@choice_option(
    "--from",
    "from_fmt",
    choices=READ_FORMATS,
    default="auto",
    help="Input format; auto: detected from the extension and first record.",
)
@block_size_option("Tokens per block when reading (default: the input format's).")
@click.option(
    "--tokenizer",
    default=None,
    help="openai-chat input: a transformers tokenizer name or path, or 'bytes' "
    "(the documented byte-level fallback).",
)
@click.option("--endpoint", default=None, help="kv-events input: the engine to take.")
@int_option("--rank", min=0, help="kv-events: its DP rank.")
@click.option(
    "--medium", default="GPU", show_default=True, help="kv-events: events of this medium."
)
@skip_bad_option("Skip malformed records (counted) instead of failing.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert(
    in_path: Path,
    out_path: Path,
    to_fmt: str | None,
    from_fmt: str,
    block_size: int | None,
    tokenizer: str | None,
    endpoint: str | None,
    rank: int | None,
    medium: str,
    skip_bad: bool,
    force: bool,
) -> None:
    """Convert trace IN to OUT in format --to (read, then write the canonical table).

    Reads every format ``traces`` knows (mooncake, bailian, azure, burstgpt,
    tokens, parquet, vLLM token JSONL, SGLang request dumps, LMCache lookup
    logs, OpenAI chat JSONL with --tokenizer, and a `listen` recording folder)
    and writes mooncake, bailian, tokens, parquet, burstgpt, vllm, sglang or
    lmcache. Token-level outputs keep the sharing structure, not the ids; read
    them back with --block-size of the input.

    \b
    Examples:
      sage-kv-stats convert requests.jsonl trace.parquet
      sage-kv-stats convert vllm_requests.jsonl mc.jsonl --to mooncake --block-size 16
      sage-kv-stats convert chats.jsonl t.parquet --tokenizer Qwen/Qwen2.5-0.5B-Instruct
      sage-kv-stats convert recording/ trace.jsonl --to mooncake --endpoint tcp://h:5557
    """
    from sagellm_kv_cache.errors import KVCacheError
    from traces import read_trace, write_trace

    if to_fmt is None:
        if out_path.suffix.lower() != ".parquet":
            raise click.BadParameter(
                f"give the output format for {out_path.name} ({', '.join(WRITE_FORMATS)})",
                param_hint="--to",
            )
        to_fmt = "parquet"
    if not in_path.exists():
        raise click.BadParameter(f"{in_path}: no such file or folder", param_hint="IN")
    if out_path.exists() and not force:
        raise click.BadParameter(
            f"{out_path} exists; pass --force to overwrite it", param_hint="OUT"
        )
    if out_path.resolve() == in_path.resolve():
        raise click.BadParameter("OUT must differ from IN", param_hint="OUT")
    check_out_dir(out_path.parent, "OUT")
    options: dict = {}
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
    if endpoint is not None or rank is not None or medium != "GPU":
        options.update(endpoint=endpoint, data_parallel_rank=rank, medium=medium)
    stats: dict = {}
    try:
        fmt = from_fmt
        if fmt == "auto":
            from traces.io import detect_format

            fmt = detect_format(in_path)
        if fmt == "kv-events" and "medium" not in options:
            options.update(endpoint=endpoint, data_parallel_rank=rank, medium=medium)
        table = read_trace(
            in_path, fmt, block_size=block_size, skip_bad=skip_bad, stats=stats, **options
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_trace(table, out_path, to_fmt)
    except KVCacheError as err:
        raise _fail(err, in_path) from None
    except FileNotFoundError as err:
        raise click.BadParameter(str(err), param_hint="IN") from None
    skipped = stats.get("skipped", 0)
    note = f" ({skipped} malformed records skipped)" if skipped else ""
    click.echo(f"{in_path} ({fmt}) -> {out_path} ({to_fmt}): {len(table)} requests{note}")


COMMANDS = [convert]
