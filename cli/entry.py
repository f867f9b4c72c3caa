"""The ``sage-kv-stats`` console entry: checks the workbench is installed, then runs the CLI.

The library core installs with numpy, torch and prometheus-client only; the
commands need the ``[workbench]`` extra (click, polars, ...). On a base install
this module (standard library only) prints one line naming the extra and exits
with :data:`EXIT_MISSING`, instead of the traceback an ``import click`` would give.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

#: Import names of the ``[workbench]`` extra's packages (pyproject.toml), checked in this order.
WORKBENCH_MODULES = ("click", "tqdm", "polars", "pyarrow", "scipy", "matplotlib", "msgspec")
#: Exit status when the workbench is not installed (click's own usage errors exit 2).
EXIT_MISSING = 3
INSTALL_HINT = (
    "pip install 'sagellm-kv-cache[workbench]' (from a checkout: pip install -e '.[workbench]')"
)


def missing_workbench_modules() -> list[str]:
    """The workbench packages that cannot be imported here (none: the CLI can run)."""
    missing = []
    for name in WORKBENCH_MODULES:
        try:
            if find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a broken or half-removed install
            missing.append(name)
    return missing


def main() -> None:
    """``sage-kv-stats``: one line and exit status 3 without the workbench, else the click group."""
    missing = missing_workbench_modules()
    if missing:
        print(
            f"sage-kv-stats: the workbench extra is not installed (missing: {', '.join(missing)}); "
            f"install it with: {INSTALL_HINT}",
            file=sys.stderr,
        )
        sys.exit(EXIT_MISSING)
    from cli.main import cli

    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
