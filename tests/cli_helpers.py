"""Running the command line in tests and asserting on what a user sees: shared by the CLI tests."""

from __future__ import annotations

from typer.testing import CliRunner

from mdsens.cli import app

runner = CliRunner()


def cli(*args):
    """``mdsens ARGS`` in this process; every argument is turned into a string."""
    return runner.invoke(app, [str(a) for a in args])


def describe(result) -> str:
    """Everything a failing assertion should show about a CLI result."""
    return (
        f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{result.exception!r}"
    )


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, no traceback, exactly one non-blank line of output, an error naming each needle."""
    assert result.exit_code == 2, describe(result)
    assert result.exception is None or isinstance(result.exception, SystemExit), describe(result)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), describe(result)
    for needle in needles:
        assert needle in lines[0], describe(result)
    return lines[0]
