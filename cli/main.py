"""``sage-kv-stats``: a thin click group over the library, ``sim`` and the analyses.

Each command lives in its own module and only parses options and calls the
library; heavy imports (polars, matplotlib, torch) happen inside commands so
``sage-kv-stats --help`` stays fast.
"""

from __future__ import annotations

import click

from . import (
    calibrate_cmds,
    convert_cmds,
    events_cmds,
    profiling_cmds,
    replay_cmds,
    report_cmds,
    sweep_cmds,
)


class KVGroup(click.Group):
    """The command group; a library error that escapes a command becomes one line.

    Commands report the mistakes they know about themselves (naming the option
    or the file and line); this is the net under them: any ``KVCacheError``
    prints ``Error: [CODE] message`` and exits 1, never a traceback, and an
    ``EOFError`` or ``MemoryError`` from a command is reported as what it is
    (click would print ``Aborted!`` for the first and a traceback for the second).
    A missing optional package names the extra that installs it.
    """

    def invoke(self, ctx: click.Context):
        from sagellm_kv_cache.errors import KVCacheError

        try:
            return super().invoke(ctx)
        except KVCacheError as err:
            raise click.ClickException(f"[{err.code}] {err.message}") from None
        except EOFError as err:
            raise click.ClickException(f"unexpected end of input ({err})") from None
        except MemoryError as err:
            raise click.ClickException(
                f"out of memory{f' ({err})' if str(err) else ''}; use a smaller capacity or trace"
            ) from None
        except ModuleNotFoundError as err:
            extra = OPTIONAL_EXTRAS.get((err.name or "").partition(".")[0])
            if extra is None:
                raise
            raise click.ClickException(
                f"this needs {err.name}, which is not installed: "
                f"pip install 'sagellm-kv-cache[{extra}]'"
            ) from None


#: Optional packages a command may import, and the extra (pyproject.toml) that installs each.
OPTIONAL_EXTRAS = {
    "click": "workbench",
    "tqdm": "workbench",
    "polars": "workbench",
    "pyarrow": "workbench",
    "scipy": "workbench",
    "matplotlib": "workbench",
    "pandas": "analysis",
    "xxhash": "fast",
    "zmq": "events",
    "msgspec": "workbench",
    "ray": "ray",
    "nixl": "nixl",
    "nbclient": "notebooks",
    "papermill": "notebooks",
}


@click.group(
    cls=KVGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="sagellm-kv-cache")
def cli() -> None:
    """sage-kv-stats: profile, replay and analyse KV-cache behaviour.

    \b
    Examples:
      sage-kv-stats replay                       # bundled Mooncake trace
      sage-kv-stats sweep traces/data/mooncake_synthetic_trace.jsonl
      sage-kv-stats demo --num-accesses 1000 --output demo_stats.json
      sage-kv-stats visualize --input demo_stats.json --type all --summary
    """


for _module in (
    profiling_cmds,
    replay_cmds,
    sweep_cmds,
    report_cmds,
    events_cmds,
    convert_cmds,
    calibrate_cmds,
):
    for _cmd in _module.COMMANDS:
        cli.add_command(_cmd)


if __name__ == "__main__":  # pragma: no cover
    cli()
