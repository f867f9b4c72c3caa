"""``sage-kv-stats``: a thin click group over the library, ``sim`` and the analyses.

Each command lives in its own module and only parses options and calls the
library; heavy imports (polars, matplotlib, torch) happen inside commands so
``sage-kv-stats --help`` stays fast.
"""

from __future__ import annotations

import click

from . import profiling_cmds, replay_cmds, sweep_cmds


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


for _module in (profiling_cmds, replay_cmds, sweep_cmds):
    for _cmd in _module.COMMANDS:
        cli.add_command(_cmd)


if __name__ == "__main__":  # pragma: no cover
    cli()
