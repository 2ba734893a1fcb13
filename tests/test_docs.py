"""The documentation that is generated from the code is up to date."""

from pathlib import Path

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
