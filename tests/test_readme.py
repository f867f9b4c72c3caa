"""The README stays true to the code it documents."""

from __future__ import annotations

from pathlib import Path

from sagellm_kv_cache.eviction import list_policies

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_registered_policy_is_in_the_policy_table():
    for name in list_policies():
        assert f"| `{name}`" in README, f"policy {name!r} missing from README's table"


def test_every_cli_command_is_shown():
    from cli.main import cli

    for name in cli.commands:
        assert f"sage-kv-stats {name}" in README, f"command {name!r} missing from README"


def test_the_two_setup_commands_are_there():
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]" && sage-kv-stats replay' in README
    assert "python -m pytest -q" in README
