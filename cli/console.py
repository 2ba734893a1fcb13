"""The CLI's two consoles and its error policy: library errors become one line and an exit code.

Exit codes: 0 success; 1 the computation failed (relaxation not converged, linear solve failed);
2 bad input (unknown system or parameter, bad ``--set``, missing run, unreadable file), reported
as one line without a traceback, with nothing written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mdsens.errors import NotConvergedError, UserError

# Results go to stdout (the run directory is its last line, for scripts); progress, warnings and
# errors to stderr.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

T = TypeVar("T")


def fail(message: str, code: int) -> typer.Exit:
    """Print ``message`` as one error line; return the exit to raise."""
    err.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def guarded(action: Callable[[], T]) -> T:
    """Run ``action()`` and turn the library's errors into one-line messages and exit codes."""
    try:
        return action()
    except UserError as error:
        raise fail(str(error), 2) from None
    except (NotConvergedError, FloatingPointError) as error:
        raise fail(str(error), 1) from None
