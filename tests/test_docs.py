"""The documentation generated from the code is up to date, and the help it prints reads well."""

import inspect
import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from mdsens.cli import app
from mdsens.cli.docs import cli_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_is_generated_from_the_code():
    # Regenerate with: python -m mdsens.cli.docs > docs/cli.md
    assert (DOCS / "cli.md").read_text() == cli_reference()


def test_cli_reference_covers_every_command_and_option():
    text = cli_reference()
    for command in ("relax", "sensitivity", "plot", "check", "export", "paper", "systems"):
        assert f"## `mdsens {command}`" in text
    for option in ("--structure", "--set", "--param", "--solver", "--tol", "--format"):
        assert f"`{option}`" in text


COMMANDS = ("relax", "sensitivity", "plot", "check", "export", "paper", "systems")
# What Typer's Rich help printed beside every option, flags and --help included.
TYPE_MARKER = re.compile(r"<(bool|str|int|float|path|list\[\w+\])>")


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [(), *((c,) for c in COMMANDS)], ids=["mdsens", *COMMANDS])
def test_help_names_values_not_python_types(command):
    text = help_text(*command)
    assert not TYPE_MARKER.search(text), TYPE_MARKER.search(text).group()


def test_help_shows_values_by_name_and_paired_flags_together():
    text = help_text("sensitivity")
    for shown in ("--param NAME", "--run DIR", "--solver cg|dense", "--spectrum / --no-spectrum"):
        assert shown in text
    assert "--set KEY=VALUE" in help_text("relax")


def test_command_list_shows_each_summary_whole():
    """Each command's first docstring paragraph, rewrapped (no hard line breaks, nothing cut)."""
    flat = " ".join(help_text().split())
    for name, command in typer.main.get_command(app).commands.items():
        summary = " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split())
        assert f"{name} {summary}" in flat
